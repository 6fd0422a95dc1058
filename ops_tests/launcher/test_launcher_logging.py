"""The CLI console shows our warnings without --debug (STYLE.md: logger names under one root, `lmforge.`) and
still hides library chatter below ERROR. No Ray, no job: the CLI's own logging set-up and the modules'
own loggers."""
from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from launcher import cli

PACKAGES = ("launcher", "parallel", "data_pipeline", "models", "kernels")


@pytest.fixture
def cli_console(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], Callable[[], str]]]:
    """Installs the CLI's console handler (non-debug) on the root logger when called, in the test itself:
    the handler binds the stderr of that moment, which is the captured one only during the call phase.
    Returns a reader of what reached the console; the handler is removed afterwards."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level

    def install() -> Callable[[], str]:
        cli._setup_logging(debug=False)
        assert len(root.handlers) > len(before), "_setup_logging added no handler"
        return lambda: capsys.readouterr().err

    try:
        yield install
    finally:
        for h in [h for h in root.handlers if h not in before]:
            root.removeHandler(h)
        root.setLevel(level)


def test_console_shows_checkpoint_and_data_warnings(cli_console: Callable[[], Callable[[], str]],
                                                    tmp_path: Path) -> None:
    from parallel import checkpoint

    prepare = importlib.import_module("data_pipeline.prepare")  # the package exports a function of that name
    (tmp_path / "step_3").mkdir()  # a checkpoint directory without its manifest
    console_err = cli_console()
    assert checkpoint.latest_good(tmp_path) is None  # warns through the module's own logger
    prepare.log.warning("a warning from data_pipeline.prepare")
    logging.getLogger("somelibrary.internals").warning("library chatter")
    err = console_err()
    assert f"skipping checkpoint {tmp_path / 'step_3'}: no manifest" in err
    assert "a warning from data_pipeline.prepare" in err
    assert "library chatter" not in err  # the filter still keeps other libraries' warnings off the console


def _module_loggers() -> dict[str, logging.Logger]:
    found = {}
    for pkg in PACKAGES:
        for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
            for name, value in vars(importlib.import_module(info.name)).items():
                if isinstance(value, logging.Logger):
                    found[f"{info.name}.{name}"] = value
    return found


def test_every_package_logger_is_under_the_lmforge_root() -> None:
    loggers = _module_loggers()
    # The modules that log today: a walk that found none of them would prove nothing.
    assert {"parallel.checkpoint.log", "data_pipeline.prepare.log", "launcher.tracking.log"} <= loggers.keys()
    outside = {where: lg.name for where, lg in loggers.items() if not lg.name.startswith("lmforge.")}
    assert not outside, f"loggers the console drops without --debug: {outside}"
