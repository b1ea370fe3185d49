"""Composition: config → policy, checks context, relay, queue, web — wired into one Server.

No module-level state: everything a process needs is built here from the config and passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mailguard.checks import CheckContext, run_checks
from mailguard.config import Config
from mailguard.errors import ConfigError
from mailguard.guard import Analyzer
from mailguard.policy import Policy, builtin_policy, decide, load_policy
from mailguard.policy.decision import Decision
from mailguard.server import Server

if TYPE_CHECKING:
    from mailguard.message import MessageView

# The policy used when the config names none: the shipped default next to the package (source
# checkout), else the built-in equivalent.
SHIPPED_POLICY = Path(__file__).resolve().parent.parent / "policies" / "default.toml"


def policy_for(cfg: Config) -> Policy:
    if cfg.policy.file:
        return load_policy(cfg.policy.file)
    if SHIPPED_POLICY.is_file():
        return load_policy(SHIPPED_POLICY)
    return builtin_policy()


def make_analyzer(cfg: Config, policy: Policy) -> Analyzer:
    """view → Decision: look up what the checks need (I/O), then run the pure checks and policy."""
    ctx = CheckContext(org=policy.org)

    async def analyze(view: MessageView) -> Decision:
        result = run_checks(view, ctx)
        env = view.envelope
        assert env is not None
        return decide(policy, result.findings, env)

    return analyze


def build_server(
    cfg: Config,
    reload_cfg: Callable[[], Config],
    *,
    worker: int = 0,
    reuse_port: bool = False,
    dry_run: bool = False,
) -> Server:
    """Validate config + policy (ConfigError on trouble) and build the Server for one process."""
    policy_for(cfg)  # refuse a bad policy before anything starts

    def load() -> tuple[Config, Analyzer]:
        c = reload_cfg()
        return c, make_analyzer(c, policy_for(c))

    if dry_run:
        return Server(cfg)
    return Server(cfg, load=load, reuse_port=reuse_port)


__all__ = ["ConfigError", "build_server", "make_analyzer", "policy_for"]
