"""The command line every peer quantizer script shares (each runs inside its own venv, with this folder on its
path as the script's own)."""

from __future__ import annotations

import argparse


def peer_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="JSON list of calibration windows (lists of token ids)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    return ap
