"""Sandbox networking that never touches the worker.

A pipeline's ``network:`` rule (rules.py) is one of: off (the default: only loopback), internet (its own network
namespace with user-mode networking from slirp4netns, with the worker's own addresses, loopback, link-local, cloud
metadata and private ranges unreachable: namespace.py) or a host allowlist (only loopback plus a worker-side HTTP(S)
proxy, proxy.py, that reaches allowed hosts only). The worker's policy (policy.py) says which rules pipelines may
use and which internal addresses stay reachable; providers.py maps the same rule onto E2B's and Modal's own egress
controls. broker.py (credential brokering) plugs into the proxy through its `BrokerHook` interface.
"""
