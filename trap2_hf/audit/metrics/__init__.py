"""Metric scripts shipped with the package: `evaluate.load` cannot fetch the Hub-hosted ones offline."""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = ("accuracy",)


def load_metric(name: str = "accuracy", **kwargs):
    """`evaluate.load` on the copy of metric `name` shipped here (no network); kwargs go to `evaluate.load`."""
    import evaluate

    if name not in SHIPPED:
        raise ValueError(
            f"No metric {name!r} ships with trap2_hf; shipped: {', '.join(SHIPPED)}. "
            "For another metric, pass the path of a local evaluate script to evaluate.load(...)."
        )
    return evaluate.load(os.path.join(_HERE, f"{name}.py"), **kwargs)
