from tokenbroker import Reason, _core


def test_python_reasons_match_the_core_one_for_one():
    assert [(r.value, r.name) for r in Reason] == _core.reason_names()
