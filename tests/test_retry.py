"""Retry rules: parsing (scalebox_hpc.retry.RetryRules.parse) and evaluation."""
import pytest

from scalebox_hpc.errors import ConfigError
from scalebox_hpc.retry import RetryRules
from scalebox_hpc.states import Code


def retries_allowed(rules, code):
    return RetryRules(tuple(rules)).retries(code)


def should_retry(rules, code, executions):
    return RetryRules(tuple(rules)).allows(code, executions)


SPEC_RULES = [("1", 3), ("2", 2), ("*", 1)]  # "['1:3','2:2','*']", '*' defaulting to 1 retry
LEASE_LOST_DEFAULT_RETRIES = Code.LEASE_LOST_DEFAULT_RETRIES


def executions_until_done(rules, code):
    """Simulate a program that always exits with ``code``: run, then retry while allowed."""
    executions = 0
    while True:
        executions += 1
        if not should_retry(rules, code, executions):
            return executions


@pytest.mark.parametrize("code, expected", [(1, 4), (2, 3), (3, 2), (0, 1), (124, 2)])
def test_spec_retry_example(code, expected):
    assert executions_until_done(SPEC_RULES, code) == expected


def test_retries_allowed():
    assert retries_allowed(SPEC_RULES, 1) == 3
    assert retries_allowed(SPEC_RULES, 2) == 2
    assert retries_allowed(SPEC_RULES, 99) == 1
    assert retries_allowed(SPEC_RULES, -101) == 1
    assert retries_allowed(SPEC_RULES, 0) == 0
    assert retries_allowed([("0", 5), ("*", 5)], 0) == 0
    assert retries_allowed([], 1) == 0
    assert retries_allowed([("1", 3)], 2) == 0
    # the first matching rule wins, and an explicit code beats an earlier '*'
    assert retries_allowed([("*", 4), ("1", 1), ("1", 9)], 1) == 1
    assert retries_allowed([("*", 4), ("*", 9)], 5) == 4


def test_lease_lost_default():
    assert retries_allowed([], 123) == LEASE_LOST_DEFAULT_RETRIES == 3
    assert retries_allowed([("*", 0)], 123) == LEASE_LOST_DEFAULT_RETRIES
    assert retries_allowed([("*", 10)], 123) == LEASE_LOST_DEFAULT_RETRIES
    assert retries_allowed([("123", 0), ("*", 10)], 123) == 0
    assert retries_allowed([("123", 7)], 123) == 7
    assert executions_until_done([("1", 3)], 123) == LEASE_LOST_DEFAULT_RETRIES + 1


@pytest.mark.parametrize("value, expected", [
    (None, []),
    ("['1:3','2:2','*']", [("1", 3), ("2", 2), ("*", 1)]),
    ("1:3, -9:1,*:5", [("1", 3), ("-9", 1), ("*", 5)]),
    (["+2:0", "*"], [("2", 0), ("*", 1)]),
    ("[]", []),
])
def test_parse_retry_rules(value, expected):
    assert RetryRules.parse(value).rules == tuple(expected)


@pytest.mark.parametrize("value", ["1", "1:-1", "a:b", ["*", "*:2"], [1], {"1": 3}])
def test_parse_retry_rules_rejects(value):
    with pytest.raises(ConfigError):
        RetryRules.parse(value, file="app.yaml", key="k", line=3)


def test_parse_errors_name_the_rule():
    with pytest.raises(ConfigError, match="invalid retry rule 'x:2'"):
        RetryRules.parse(["1:3", "x:2"], file="app.yaml", key="modules.m.retry_rules", line=5)
    with pytest.raises(ConfigError, match="given twice"):
        RetryRules.parse("1:3,1:4")


def test_json_round_trip():
    rules = RetryRules.parse("['1:3','*']")
    assert RetryRules.from_json(rules.to_json()) == rules
