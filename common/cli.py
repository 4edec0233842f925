"""The edge of every command: argparse types that refuse bad values, a parser that reports them in one line, and
the top-level handler each entry point runs under.

Bad input stops a command with one line, `error: <file or flag>: <what is wrong> (<how to fix it>)`, exit status 2,
and no traceback; a run folder that --force was replacing is put back as it was (common.runs). Programming errors
still raise with their traceback.

    from common.cli import ArgumentParser, positive_int, run
    ...
    if __name__ == "__main__":
        run(main, parse_args)
"""
import argparse
import math
import sys

from common.errors import DataError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: argument --epochs: must be an integer >= 1, got '0' (see --help)`."""

    def error(self, message):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _number(kind, text, low, high=None, low_open=False):
    """kind(text) checked against low (inclusive, or exclusive with low_open) and high (inclusive, None: none)."""
    what = "an integer" if kind is int else "a number"
    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if (v <= low if low_open else v < low) or (high is not None and v > high):
        bounds = (f"> {low}" if low_open else f">= {low}") + ("" if high is None else f" and <= {high}")
        raise argparse.ArgumentTypeError(f"must be {what} {bounds}, got {text!r}")
    return v


def positive_int(text):
    """argparse type: an integer >= 1 (epochs, steps, batch sizes, image sizes, counts)."""
    return _number(int, text, 1, None)


def nonneg_int(text):
    """argparse type: an integer >= 0 (patience, warm-up steps, 'every N steps' where 0 means never)."""
    return _number(int, text, 0, None)


def positive_float(text):
    """argparse type: a finite number > 0 (learning rates, temperatures, delays)."""
    return _number(float, text, 0, None, low_open=True)


def nonneg_float(text):
    """argparse type: a finite number >= 0 (loss weights, guidance scales)."""
    return _number(float, text, 0, None)


def fraction(text):
    """argparse type: a share strictly between 0 and 1 (validation fraction, female share)."""
    v = _number(float, text, 0, 1, low_open=True)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must be a number > 0 and < 1, got {text!r}")
    return v


def port(text):
    """argparse type: a TCP port, 0-65535 (0: any free port)."""
    return _number(int, text, 0, 65535)


def unit_interval(text):
    """argparse type: a number in [0, 1] (probabilities, EMA decays)."""
    return _number(float, text, 0, 1)


def int_list(low=1, allow_empty=False):
    """argparse type for comma-separated integers >= low ('1,2,2'). Returns the text unchanged (the scripts split it
    where they use it, and their configs record it as typed)."""
    def check(text):
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        if not parts and not allow_empty:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}")
        for p in parts:
            try:
                _number(int, p, low, None)
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentTypeError(f"must be comma-separated integers >= {low} (e.g. '1,2,2'), "
                                                 f"got {text!r}")
        return ",".join(parts)
    return check


def name_list(choices):
    """argparse type for a comma-separated subset of choices ('cxr,mri'). Returns the text unchanged."""
    def check(text):
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        unknown = [p for p in parts if p not in choices]
        if not parts or unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown)) or 'empty list'} in "
                                             f"{text!r}; choose from {', '.join(choices)}")
        return ",".join(parts)
    return check


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler's time limit), handled like Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def run(main, parse_args):
    """Run an entry point: main(parse_args()) under the one top-level handler of bad input.

    DataError (bad data, files or flags found past argparse) and OSError with a file name (unwritable or missing
    path, a file where a folder is expected) become one line and exit status 2; Ctrl-C and SIGTERM exit 130 with a
    note on how to continue. Whenever the command does not succeed, a run folder that --force was replacing is put
    back (common.runs.settle_replaced, which says where the unfinished new run went); under torchrun the ranks
    leave the process group together once all have succeeded, and exit there (common.runs.finish_distributed).
    Anything else is a bug: it raises with its traceback (after the same restore). A command run as `python -m`
    that succeeds appends its times to $FAIRSYNTH_STAGE_LOG when a study set it (common.stages.log_stage_time)."""
    import signal
    import time
    from common.runs import finish_distributed, settle_replaced
    from common.stage_server import process_age
    from common.stages import log_stage_time
    started, t0 = process_age(), time.perf_counter()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = main(parse_args())
    except DataError as e:
        settle_replaced(ok=False)
        print(e.code, file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        settle_replaced(ok=False)
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror or e} (check that the path exists, is of the right kind, and that "
              f"you may write there)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        settle_replaced(ok=False)
        print("interrupted: run the same command again to start over, or with --resume (where the script has it) to "
              "continue from its last checkpoint", file=sys.stderr)
        sys.exit(130)
    except BaseException:
        settle_replaced(ok=False)
        raise
    settle_replaced(ok=True)
    spec = getattr(sys.modules.get(main.__module__), "__spec__", None)
    if main.__module__ == "__main__" and spec is not None:  # a process of its own (a forked stage logs in fork_stage)
        log_stage_time(spec.name, sys.argv[1:], started, time.perf_counter() - t0)
    finish_distributed()
    return result


def as_argv(add_flags, args):
    """The flags that add_flags(parser) declares, with their values in args, as a command line: how a study passes
    a script's flags on to that script's stages (`--epochs 16 --pretrained ...`). BooleanOptionalAction flags
    become --x / --no-x, store_true ones appear only when set, flags whose value is None are left out.
    The one function besides main/parse_args that takes a parsed Namespace: it reads no setting, it turns a
    parser's values back into flags (a study's main calls it; common.runs.write_config records them likewise)."""
    argv = []
    for action in add_flags(argparse.ArgumentParser(add_help=False))._actions:
        if not action.option_strings:
            continue
        value = getattr(args, action.dest)
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(action.option_strings[0] if value else action.option_strings[1])
        elif isinstance(action, argparse._StoreTrueAction):
            argv += [action.option_strings[0]] if value else []
        elif type(action) is argparse._StoreAction and action.nargs is None:
            argv += [action.option_strings[0], str(value)] if value is not None else []
        else:
            raise TypeError(f"as_argv: {action.option_strings[0]} is a {type(action).__name__} (nargs "
                            f"{action.nargs}); only single values and on/off flags are passed on")
    return argv


def key_files(items, flag):
    """KEY=FILE items of a repeated flag -> {KEY: [FILE, ...]}, in order: a key repeats once per file (a file name
    may hold commas: your data's run folders are named after the labels asked, e.g. sex-F-finding,covid)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise DataError(f"{flag} {item!r}: expected KEY=FILE, e.g. {flag} gan=runs/fold0/gan/samples.npz")
        out.setdefault(key, []).append(value)
    return out


def key_values(items, flag="--tag", reserved=()):
    """KEY=VALUE items of a repeated flag -> {KEY: VALUE}, integers as int (e.g. the columns a stage writes into
    its preds.csv: --tag fold=0 --tag condition=balanced_real); a key in `reserved` (a column the stage writes
    itself) is refused."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise DataError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} fold=0")
        if key in reserved or key.startswith(("y_", "p_", "thr_")):
            raise DataError(f"{flag} {item!r}: {key} is a column the script writes itself; choose another name")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out
