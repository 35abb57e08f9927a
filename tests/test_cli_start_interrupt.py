"""Ctrl-C or SIGTERM while the command's modules load ends it with one line (exit 130 or
143, nothing written), as it does later in a run; ``import optcc`` loads neither onnx nor
onnxruntime until a public name needs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from optcc import __main__ as entry


class _InterruptCliImport:
    """A meta-path finder that delivers ``signum`` when ``optcc.cli`` is imported; with
    ``in_extension``, as a C extension's initialisation passes it on: an ImportError
    raised from it."""

    def __init__(self, signum: int, in_extension: bool) -> None:
        self.signum, self.in_extension = signum, in_extension

    def find_spec(self, name, path=None, target=None):
        if name == "optcc.cli":
            try:
                if self.signum == signal.SIGINT:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), self.signum)  # its handler runs at the next instruction, still here
            except BaseException as error:
                if self.in_extension:
                    raise ImportError("initialization failed") from error
                raise
        return None


@pytest.mark.parametrize("in_extension", [False, True])
@pytest.mark.parametrize("signum, line", [(signal.SIGINT, "optcc: interrupted; nothing written"),
                                          (signal.SIGTERM, "optcc: terminated; nothing written")])
def test_a_signal_while_modules_load_is_one_line(monkeypatch, capsys, signum, line, in_extension):
    monkeypatch.delitem(sys.modules, "optcc.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptCliImport(signum, in_extension), *sys.meta_path])
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert entry.main() == 128 + signum
    finally:
        signal.signal(signal.SIGTERM, before)  # the entry keeps its handler for the process's life
    assert capsys.readouterr().err.splitlines() == [line]


def test_an_import_error_of_its_own_is_not_taken_for_a_signal(monkeypatch):
    monkeypatch.setitem(sys.modules, "optcc.cli", None)  # importing it raises ImportError
    with pytest.raises(ImportError):
        entry.main()


def test_import_optcc_loads_no_runtime():
    code = ("import sys, optcc; loaded = [m for m in ('onnx', 'onnxruntime', 'onnx_ir', 'numpy') if m in sys.modules]; "
            "print(loaded); optcc.optimize; print('onnxruntime' in sys.modules or 'onnx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "True"  # a public name imports what it needs
