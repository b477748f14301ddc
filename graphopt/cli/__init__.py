"""The ``graphopt`` command. Each verb is a module with ``add_parser`` and ``run``.

Exit codes: 0 ok, 1 a check or run failed, 2 usage error (bad pipeline text,
unknown pass or model, unreadable file, output exists, a runtime or optional
package not available here), 130 interrupted, 143 terminated (SIGTERM: partial
outputs are removed as on Ctrl-C), 141 stdout closed by its reader (``| head``;
nothing printed). Errors are one line on stderr; ``--debug`` (before or after
the verb) shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from graphopt.errors import (
    ArtifactError,
    BackendUnavailableError,
    GraphoptError,
    ModelNotFoundError,
    PipelineParseError,
    Terminated,
    first_line,
)
from graphopt.process import quiet_third_party

__all__ = ["main", "VERBS"]

#: verb modules under graphopt.cli, in the order ``graphopt --help`` lists them
VERBS = ["passes", "models", "inspect", "optimize", "reproduce", "run", "runtimes", "check_tensorrt", "serve_stages", "finetune", "demo", "bench", "tune"]

USAGE_ERRORS = (PipelineParseError, ModelNotFoundError, ArtifactError, BackendUnavailableError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 2 with one line, like every usage error
        self.exit(2, f"graphopt: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphopt", description="Graph optimization for recommendation models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and torch's full errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for verb in VERBS:
        importlib.import_module(f"graphopt.cli.{verb}").add_parser(sub)
    for verb_parser in dict.fromkeys(sub.choices.values()):  # `graphopt VERB ... --debug` works too
        verb_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                 help="show tracebacks and torch's full errors (also before the verb)")
        verb_parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                 help="log what each step does (also before the verb)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.debug:
        os.environ["GRAPHOPT_DEBUG"] = "1"
    else:
        quiet_third_party()
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None  # unwind like Ctrl-C
    try:
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # a closed stdout fails here, where it is caught, not in the flush at exit
        return code
    except GraphoptError as e:
        if args.debug:
            raise
        print(f"graphopt: error: {e}", file=sys.stderr)
        if isinstance(e, PipelineParseError) and e.pointer():
            print(e.pointer(), file=sys.stderr)
        return 2 if isinstance(e, USAGE_ERRORS) else 1
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("graphopt: terminated", file=sys.stderr)
        return 143
    except OSError as e:  # a file the user named: missing, a folder, unreadable
        if isinstance(e, BrokenPipeError) and _stdout_gone():  # `graphopt passes | head -1`: the reader left
            return _stdout_closed()
        if args.debug:
            raise
        print(f"graphopt: error: {first_line(e, with_type=True)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug or an unforeseen input: one line, and how to see more
        if args.debug:
            raise
        print(f"graphopt: error: {first_line(e, with_type=True)} (unexpected; --debug shows the traceback, "
              "please report it)", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _stdout_gone() -> bool:
    """Whether stdout is a pipe its reader closed (poll reports an error on it), not some other pipe."""
    try:
        import select

        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll here, or stdout is no file: say nothing quietly
        return False


def _stdout_closed() -> int:
    """Stop quietly, as `yes | head` does: stdout pointed at /dev/null so that the flush at exit finds no
    broken pipe; 141 = 128 + SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is no file (pytest's capture): nothing to flush
        pass
    return 141


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
