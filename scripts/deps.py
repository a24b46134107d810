"""Prints the project's runtime dependencies plus the named extras, one per line, for
`pip install` (pip cannot install only the dependencies of a maturin project)."""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
deps = list(project.get("dependencies", []))
for extra in sys.argv[1:]:
    deps += project.get("optional-dependencies", {})[extra]
print("\n".join(deps))
