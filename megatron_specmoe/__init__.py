"""megatron_specmoe: Speculative MoE for Megatron-Core.

Importing this package does no work and imports neither megatron nor TransformerEngine. Folders by
role (docs/architecture.md has the map and the tiers):

    predict/ schedule/ measure/ artifacts/ sim/   pure planning code (no torch.distributed, no megatron)
    comm/                                         collectives that take their process groups as arguments
    megatron/                                     the Megatron-Core plug-in (dispatcher, specs, shuffle layer)
    megatron_lm/                                  Megatron-LM's side (arguments, runtime hooks, launcher)
    cli/                                          the ``specmoe`` command
    demo/ testing/                                the demo and the test harness (never imported by the above)

``install()`` makes ``TransformerConfig(moe_token_dispatcher_type="specmoe")`` build a
``MoELayer`` with the specmoe dispatcher (an explicit, idempotent, reversible hook);
``uninstall()`` reverts it.
"""

__version__ = "0.1.0"

__all__ = ["install", "uninstall", "is_installed", "__version__"]


def install() -> None:
    """Install the ``specmoe`` dispatcher hook into Megatron-Core (idempotent)."""
    from megatron_specmoe.megatron.install import install as _install

    _install()


def uninstall() -> None:
    """Remove the hook that ``install()`` added (idempotent)."""
    from megatron_specmoe.megatron.install import uninstall as _uninstall

    _uninstall()


def is_installed() -> bool:
    """Whether ``install()`` is in effect."""
    from megatron_specmoe.megatron.install import is_installed as _is_installed

    return _is_installed()
