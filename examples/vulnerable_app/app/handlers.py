"""Request handlers with planted bandit findings (shell injection, eval, pickle, weak hash)."""

import hashlib
import pickle
import subprocess


def run_report(name: str) -> bytes:
    # B602: shell=True with a user-controlled string.
    return subprocess.check_output("generate-report " + name, shell=True)


def calculate(expression: str) -> object:
    # B307: eval of user input.
    return eval(expression)


def load_session(blob: bytes) -> object:
    # B301: unpickling untrusted data.
    return pickle.loads(blob)


def fingerprint(data: bytes) -> str:
    # B324: MD5 for a security purpose.
    return hashlib.md5(data).hexdigest()


def start_debug_server() -> None:
    import flask  # not installed: bandit reads the source, it never runs it

    flask.Flask(__name__).run(host="0.0.0.0", debug=True)
