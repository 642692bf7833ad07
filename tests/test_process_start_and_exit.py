"""The ``mneme`` process's start and end: imports deferred until used (``wandb``), and the
exit that skips the interpreter's teardown but keeps the exit handlers, the output, the
status and any thread still working."""

import subprocess
import sys
import textwrap

import pytest


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("body", "status", "stderr"),
    [
        ("print('trained')", 0, ""),
        ("sys.exit('mneme: error: data.batch_size: must be positive')", 1, "data.batch_size"),
        ("sys.exit(143)", 143, ""),
    ],
)
def test_the_console_exit_keeps_status_output_and_exit_handlers(body, status, stderr):
    result = python(f"""
        import atexit, sys
        from mneme.app.cli import main as cli
        atexit.register(lambda: print("exit handler ran", flush=True))
        def main():
            sys.stdout.write("buffered, not flushed\\n")
            {body}
        cli.main = main
        cli.console_main()
        print("not reached: the process has ended")
    """)
    assert result.returncode == status, result.stderr
    assert "buffered, not flushed" in result.stdout
    assert "exit handler ran" in result.stdout
    assert "not reached" not in result.stdout
    assert stderr in result.stderr and (not stderr or result.stderr.count("\n") == 1)


def test_a_thread_still_working_finishes_before_the_process_ends():
    result = python("""
        import threading, time
        from mneme.app.cli import main as cli
        def main():
            def work():
                time.sleep(0.5)
                print("thread finished", flush=True)
            threading.Thread(target=work).start()
        cli.main = main
        cli.console_main()
    """)
    assert result.returncode == 0, result.stderr
    assert "thread finished" in result.stdout


def test_a_deferred_module_loads_on_first_use_and_not_when_modules_are_walked():
    pytest.importorskip("wandb")
    result = python("""
        import inspect, sys
        from mneme.app.cli.lazy_imports import defer_import
        assert defer_import("wandb")
        import wandb
        inspect.getmodule(inspect)  # reads __file__ off every module in sys.modules
        assert "wandb.errors" not in sys.modules, "loaded by a walk of sys.modules"
        assert type(sys.modules["wandb"]).__name__ == "_DeferredModule"
        import wandb.sdk  # a submodule loads the package first
        assert type(sys.modules["wandb"]) is type(sys), "not an ordinary module once loaded"
        assert callable(wandb.init) and wandb.__version__
        assert not defer_import("wandb"), "deferred though imported already"
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_module_that_is_not_installed_is_not_deferred():
    from mneme.app.cli.lazy_imports import defer_import

    assert not defer_import("no_such_module_mneme_test")
    assert "no_such_module_mneme_test" not in sys.modules
