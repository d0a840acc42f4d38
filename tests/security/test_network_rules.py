"""The network rule, the worker's network policy and the provider mappings: bad input gets one clear line."""

from __future__ import annotations

from typing import Any

import e2b
import modal
import pytest

from tardigrade.pipeline import PipelineError, parse_pipeline
from tardigrade.sandboxes.errors import SandboxError
from tardigrade.sandboxes.network.policy import NetworkPolicy
from tardigrade.sandboxes.network.providers import e2b_create_options, modal_create_options
from tardigrade.sandboxes.network.rules import NetworkRule, NetworkRuleError, host_matches
from tardigrade.sandboxes.policy import AppliedPolicy, PolicyError, PolicyViolation, WorkerPolicy, parse_policy


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (False, NetworkRule("off")),
        (None, NetworkRule("off")),
        (True, NetworkRule("internet")),
        ({"allow": ["PyPI.org.", "*.GitHub.com", "pypi.org", "[::1]"]},
         NetworkRule("allow", ("pypi.org", "*.github.com", "::1"))),
    ],
)  # fmt: skip
def test_network_values_parse(value: Any, expected: NetworkRule) -> None:
    assert NetworkRule.parse(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("yes", "must be false (no network), true"),
        (1, "must be false (no network), true"),
        ({"allow": []}, "sandbox.network.allow must be a non-empty list"),
        ({"allow": "pypi.org"}, "sandbox.network.allow must be a non-empty list"),
        ({"deny": ["x"]}, "unknown key(s) deny"),
        ({"allow": ["https://pypi.org/simple"]}, "sandbox.network.allow[0] is 'https://pypi.org/simple': a URL"),
        ({"allow": ["pypi.org", "pypi.org:443"]}, "sandbox.network.allow[1] is 'pypi.org:443': ports are not"),
        ({"allow": ["*"]}, "'*' may only start a rule"),
        ({"allow": ["*.com.*"]}, "'*' may only start a rule"),
        ({"allow": ["*.com"]}, "a wildcard needs a domain below it"),  # a whole top-level domain: too broad
        ({"allow": ["*.example.com"]}, None),
        ({"allow": ["user@host"]}, "a URL or path is not a host"),
        ({"allow": ["bad_host!"]}, "not a valid host name"),
        ({"allow": [None]}, "must be a host name"),
    ],
)
def test_bad_network_values_are_refused_naming_the_field(value: Any, message: str | None) -> None:
    if message is None:
        NetworkRule.parse(value)
        return
    with pytest.raises(NetworkRuleError) as refused:
        NetworkRule.parse(value)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_wildcards_match_names_below_the_domain_only() -> None:
    rule = NetworkRule.parse({"allow": ["*.github.com", "pypi.org"]})
    assert rule.allows_host("api.github.com") and rule.allows_host("a.b.github.com") and rule.allows_host("PyPI.org")
    for host in ("github.com", "evilgithub.com", "github.com.evil.net", "files.pypi.org", "pypi.org.evil.net"):
        assert not rule.allows_host(host), host
    assert not NetworkRule.parse(False).allows_host("pypi.org")
    assert host_matches("*.github.com", "API.GitHub.com.")


def test_a_pipeline_file_names_the_network_field() -> None:
    base = {"name": "p", "steps": [{"name": "s", "run": "true"}]}
    with pytest.raises(PipelineError, match=r"sandbox\.network: allow\[0\] is 'http://x\.com': a URL"):
        parse_pipeline({**base, "sandbox": {"network": {"allow": ["http://x.com"]}}})
    loaded = parse_pipeline({**base, "sandbox": {"network": {"allow": ["pypi.org"]}}})
    assert NetworkRule.parse(loaded.sandbox.network) == NetworkRule("allow", ("pypi.org",))


# -- the worker policy ---------------------------------------------------------------------------------------------


def test_policy_limits_the_modes_and_hosts_pipelines_may_use() -> None:
    policy = parse_policy({"network": {"modes": ["off", "allow"], "hosts": ["*.pypi.org", "pypi.org"]}}, "policy")
    applied = AppliedPolicy(policy)
    assert applied.check_network(False) == NetworkRule("off")
    assert applied.check_network({"allow": ["pypi.org", "files.pypi.org"]}).mode == "allow"
    with pytest.raises(PolicyViolation) as refused:
        applied.check_network(True)
    assert str(refused.value).startswith("sandbox.network: asks for network mode 'internet'")
    assert "(network.modes)" in str(refused.value)
    with pytest.raises(PolicyViolation, match=r"allows host 'github\.com'.*\(network\.hosts\)"):
        applied.check_network({"allow": ["pypi.org", "github.com"]})
    with pytest.raises(PolicyViolation, match=r"network\.hosts"):
        applied.check_network({"allow": ["*.python.org"]})  # not within *.pypi.org
    with pytest.raises(PolicyViolation, match=r"network\.modes"):  # the run check (worker and client) includes it
        applied.check_run(store="file:///nowhere", network=True)


def test_default_policy_allows_every_mode() -> None:
    applied = AppliedPolicy(WorkerPolicy())
    for value in (False, True, {"allow": ["pypi.org"]}):
        applied.check_network(value)


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ({"modes": ["off", "sometimes"]}, "network.modes[1]"),
        ({"reachable": ["10.0.0.0/8", "db.internal:5432"]}, "network.reachable: [1] 'db.internal:5432' is not an IP"),
        ({"reachable": ["10.0.0.5:99999"]}, "the port must be a number from 1 to 65535"),
        ({"hosts": ["https://pypi.org"]}, "a URL or path is not a host"),
        ({"reach": []}, "unknown key (the policy takes modes, hosts, reachable)"),
    ],
)
def test_bad_network_policy_names_the_field(network: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as refused:
        parse_policy({"network": network}, "policy file p.yaml")
    assert message in str(refused.value), str(refused.value)


def test_reachable_entries_cover_their_address_and_port() -> None:
    import ipaddress

    exceptions = NetworkPolicy(reachable=["10.8.0.5:3128", "10.9.0.0/16", "[fd00::5]:443"]).exceptions
    ip = ipaddress.ip_address
    assert exceptions[0].covers(ip("10.8.0.5"), 3128) and not exceptions[0].covers(ip("10.8.0.5"), 22)
    assert exceptions[1].covers(ip("10.9.1.2"), 22) and exceptions[1].covers(ip("::ffff:10.9.1.2"), 22)
    assert exceptions[2].covers(ip("fd00::5"), 443) and not exceptions[2].covers(ip("fd00::6"), 443)


# -- E2B and Modal: the same rule through their own egress controls ------------------------------------------------


def test_e2b_gets_the_rule_as_its_egress_options() -> None:
    create = e2b.AsyncSandbox.create  # the installed SDK's real signature
    assert e2b_create_options(NetworkRule("off"), create) == {"allow_internet_access": False}
    internet = e2b_create_options(NetworkRule("internet"), create)
    assert internet["allow_internet_access"] is True
    assert {"10.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"} <= set(internet["network"]["deny_out"])
    allow = e2b_create_options(NetworkRule.parse({"allow": ["pypi.org", "*.github.com", "1.2.3.4"]}), create)
    assert allow["network"] == {"allow_out": ["pypi.org", "*.github.com", "1.2.3.4/32"], "deny_out": ["0.0.0.0/0"]}


def test_modal_gets_the_rule_as_its_outbound_allowlists() -> None:
    create = modal.Sandbox.create
    assert modal_create_options(NetworkRule("off"), create) == {"block_network": True}
    assert modal_create_options(NetworkRule("internet"), create) == {"block_network": False}
    allow = modal_create_options(NetworkRule.parse({"allow": ["pypi.org", "*.github.com", "1.2.3.4"]}), create)
    assert allow == {
        "block_network": False,
        "outbound_cidr_allowlist": ["1.2.3.4/32"],
        "outbound_domain_allowlist": ["pypi.org", "*.github.com"],
    }


def test_a_rule_an_sdk_cannot_express_is_refused() -> None:
    def old_modal_create(*args: str, block_network: bool = False, cidr_allowlist: list[str] | None = None) -> None:
        """Modal before domain allowlists: CIDRs only."""

    def old_e2b_create(template: str | None = None, allow_internet_access: bool | None = None) -> None:
        """E2B before egress rules: on or off only."""

    hosts = NetworkRule.parse({"allow": ["pypi.org"]})
    with pytest.raises(SandboxError, match="only takes CIDR allowlists"):
        modal_create_options(hosts, old_modal_create)
    with pytest.raises(SandboxError, match="no egress rules"):
        e2b_create_options(hosts, old_e2b_create)
    with pytest.raises(SandboxError, match="no egress rules"):
        e2b_create_options(NetworkRule("internet"), old_e2b_create)
    assert modal_create_options(NetworkRule.parse({"allow": ["1.2.3.4"]}), old_modal_create)["block_network"] is False
