"""Regenerates the seed corpora of the atheris harnesses, fuzz/python/corpus/<name>/.

The harnesses decode their input with atheris.FuzzedDataProvider, and the broker's sign
fresh tokens on every run, so a seed cannot be written by hand: this script draws byte
strings from a fixed pseudo-random sequence, runs each through the harness, notes what it
reached (a Validation reason, a valid token of each kind, a batch, an accepted form, a
Basic credential...), and keeps a handful of inputs that together reach everything seen
(greedy set cover, at most MAX_SEEDS per corpus). Files named `seed-*` are replaced;
others (`regression-*`: the reproducers of fixed findings) are kept.

Run from the repository: `.venv/bin/python fuzz/python/seeds.py` (about ten seconds).
"""

from __future__ import annotations

import hashlib
import importlib
import random
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
HARNESSES = {"broker_validate": "fuzz_broker_validate", "http_forms": "fuzz_http_forms"}
SAMPLES = 4000
MAX_SEEDS = 10
LENGTHS = [4, 16, 32, 64, 128, 256, 512, 1024]


def reached(harness: ModuleType, samples: int, rng: random.Random) -> dict[bytes, set[str]]:
    """What each drawn input reached (inputs the oracle flags are reported and dropped)."""
    out: dict[bytes, set[str]] = {}
    for _ in range(samples):
        data = rng.randbytes(rng.choice(LENGTHS))
        harness.NOTES = set()
        try:
            harness.TestOneInput(data)
        except harness.Finding as finding:
            print(f"  a finding (not kept as a seed): {finding}", file=sys.stderr)
            continue
        out[data] = set(harness.NOTES)
    harness.NOTES = None
    return out


def cover(found: dict[bytes, set[str]]) -> list[bytes]:
    """A few inputs that together reach every tag: each pick the one adding most (the
    shortest among equals)."""
    left = set().union(*found.values()) if found else set()
    picked: list[bytes] = []
    while left and len(picked) < MAX_SEEDS:
        best = max(found, key=lambda d: (len(found[d] & left), -len(d)))
        if not found[best] & left:
            break
        picked.append(best)
        left -= found[best]
    return picked


def main() -> None:
    sys.path.insert(0, str(HERE))
    for name, module in HARNESSES.items():
        harness = importlib.import_module(module)
        found = reached(harness, SAMPLES, random.Random(name))
        seeds = cover(found)
        corpus = HERE / "corpus" / name
        corpus.mkdir(parents=True, exist_ok=True)
        for old in corpus.glob("seed-*"):
            old.unlink()
        for data in seeds:
            (corpus / f"seed-{hashlib.sha1(data).hexdigest()[:12]}").write_bytes(data)  # noqa: S324 (a name)
        tags = sorted(set().union(*(found[d] for d in seeds))) if seeds else []
        print(
            f"{corpus.relative_to(HERE.parent.parent)}: {len(seeds)} seeds reaching {len(tags)} of "
            f"{len(set().union(*found.values()))} tags: {', '.join(tags)}"
        )


if __name__ == "__main__":
    main()
