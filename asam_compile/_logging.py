"""Registers the `asam_compile` logger with torch's logging, so that TORCH_LOGS="+asam_compile" works."""

import logging

log = logging.getLogger("asam_compile")


def _register() -> None:
    try:
        from asam_compile import _compat

        _compat.register_torch_log("asam_compile")
    except Exception:  # noqa: BLE001 - logging registration must never break an import
        log.debug("could not register with torch._logging", exc_info=True)


_register()
