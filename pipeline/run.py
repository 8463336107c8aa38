"""Entry point: ``python -m pipeline.run stage=<name|all> [hydra overrides]``.

The config is composed with Hydra's compose API from ``pipeline/conf``. User errors (an unknown key, a bad
value, a missing input) print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONF_DIR = Path(__file__).parent / "conf"


def compose(overrides: list[str]):
    """The resolved config for these command-line overrides; raises UserError on a bad override."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.config_check import check_config
    from pipeline.errors import UserError

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
        cfg.model.name  # noqa: B018  (resolves interpolations early so errors surface here)
        _name_local_model(cfg, overrides)
        check_config(cfg)  # every section, before any stage runs
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_hydra_message(err)) from None
    return cfg


def _name_local_model(cfg, overrides: list[str]) -> None:
    """With ``model.path=/dir`` and no explicit ``model.name``, runs go under the checkpoint's folder name."""
    from omegaconf import open_dict

    if cfg.model.get("path") and not any(o.lstrip("+").startswith("model.name=") for o in overrides):
        with open_dict(cfg):
            cfg.model.name = Path(str(cfg.model.path)).resolve().name


def _hydra_message(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "Could not override" in text or "not in struct" in text:
        key = text.split("'")[1] if "'" in text else text
        return f"unknown config key {key!r} (see pipeline/conf for the valid keys; prefix with + only to add new ones)"
    if "Could not find" in text or "Could not load" in text:
        return f"unknown config option: {text}"
    cause = str(err.__cause__ or "").strip().splitlines()
    if text.startswith("Error merging override") and cause and "Cannot merge" in cause[0]:
        override = text.removeprefix("Error merging override").strip()
        key = override.split("=", 1)[0]
        return (f"{key}: bad value {override.split('=', 1)[-1]} (expected the shape of the default value: "
                f"{cause[0][0].lower()}{cause[0][1:]}; where a list is expected, wrap the value in [...])")
    return f"bad config override: {text}"


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = compose(argv)
        from pipeline.runner import run_pipeline

        run_pipeline(cfg)
    except UserError as err:
        _say(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted: finished artifacts are kept; rerun the same command to resume")
        return 130
    return 0


def _say(line: str) -> None:
    """``line`` on stderr in one write, so the ranks of a torchrun that share the stream never interleave inside
    it (``print`` writes the text and the newline separately, and unbuffered stderr passes each on at once)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
