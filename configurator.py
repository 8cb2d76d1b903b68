"""
A nanoGPT-style configurator shared by every stage script.

A stage declares its settings as a flat block of module globals, then calls

    config = configure(globals())

which applies, left to right, the command line arguments:
    path/to/config.py      a Python file whose assignments override the globals
    --key=value            one override; value is parsed as a Python literal, else kept as a string

Only globals defined before the call with a simple type (int, float, bool, str, None) are settings.
An unknown --key is an error, and so is a type change (an int may become a float; a None default
takes anything). One config file serves every stage of a pipeline (config/toy.py), so its keys that
this stage does not have are skipped and listed in one printed line, where a typo shows up.
"""

import ast
import difflib
import sys

SIMPLE_TYPES = (int, float, bool, str, type(None))


def _check(key, old, new, source):
    if old is None or type(old) is type(new):
        return new
    if type(old) is float and type(new) is int:  # 1 is a fine float
        return float(new)
    raise ValueError(f"{source}: {key} must be {type(old).__name__} (default {old!r}), got {type(new).__name__} {new!r}")


def _unknown(key, known, source):
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ValueError(f"{source}: unknown config key '{key}'{hint}")


def configure(g, argv=None, verbose=True):
    """Apply config files and --key=value overrides to the dict of globals g; return the settings."""
    argv = sys.argv[1:] if argv is None else argv
    keys = [k for k, v in g.items() if not k.startswith("_") and isinstance(v, SIMPLE_TYPES)]
    for arg in argv:
        if not arg.startswith("--"):
            # a config file: run it in a fresh namespace, then apply its simple-typed names
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise ValueError(f"cannot read config file {arg}: {e}") from None
            ns = {}
            exec(compile(source, arg, "exec"), ns)
            skipped = []
            for k, v in ns.items():
                if k.startswith("_") or not isinstance(v, SIMPLE_TYPES):
                    continue
                if k not in keys:
                    skipped.append(k)
                    continue
                g[k] = _check(k, g[k], v, arg)
            if skipped and verbose:
                print(f"{arg}: keys for other stages, not used here: {', '.join(skipped)}")
            continue
        if "=" not in arg:
            raise ValueError(f"argument {arg}: expected --key=value")
        k, raw = arg[2:].split("=", 1)
        if k not in keys:
            raise _unknown(k, keys, f"argument {arg}")
        try:
            v = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            v = raw  # a bare string such as --out_dir=out/toy
        if isinstance(g[k], str) and not isinstance(v, str):
            v = raw  # --run_name=123 stays a string
        g[k] = _check(k, g[k], v, f"argument {arg}")
    return {k: g[k] for k in keys}
