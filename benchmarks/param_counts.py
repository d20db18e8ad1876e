"""Parameter counts of every encoder the project registers with timm (1000-class classifiers), built on the meta
device (no memory, no weights, any machine).

    python benchmarks/param_counts.py                    # every family
    python benchmarks/param_counts.py --prefix agent_    # the names that start with a prefix
"""

from __future__ import annotations

import argparse

import timm
import torch

import seg  # noqa: F401  (registers the encoders)

__all__ = ["FAMILY_PREFIXES", "parameter_count", "project_models"]

FAMILY_PREFIXES = ("flatten_pvt_", "flatten_swin_", "soft_", "mlla_", "agent_pvt_", "agent_swin_", "ravlt_", "mala_",
                   "pola_pvt_", "pola_swin_")


def project_models(prefix: str = "") -> list[str]:
    """The registered names of the project's families (tiny ``test_*`` variants left out), starting with
    ``prefix``."""
    return [name for name in timm.list_models() if name.startswith(FAMILY_PREFIXES) and name.startswith(prefix)]


def parameter_count(name: str) -> int:
    """Parameters of ``timm.create_model(name)`` (default arguments: the 1000-class classifier)."""
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="", help="only names starting with this")
    args = parser.parse_args()
    print("| model | parameters (M) |\n|---|---|")
    for name in project_models(args.prefix):
        print(f"| `{name}` | {parameter_count(name) / 1e6:.2f} |")


if __name__ == "__main__":
    main()
