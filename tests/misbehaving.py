"""Implementations that misbehave on purpose, each in a way the harness must survive.

They are plain functions passed to the sweep with --impl tests/misbehaving.py:NAME; only the
cell at N == TRIGGER misbehaves, so the other cells show that the sweep went on.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

TRIGGER = 64


def _good(q, k, v, causal, window):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def raises(q, k, v, *, causal, window, scale=None):
    if q.shape[2] == TRIGGER:
        raise ValueError("deliberate failure inside the kernel")
    return _good(q, k, v, causal, window)


def aborts(q, k, v, *, causal, window, scale=None):
    if q.shape[2] == TRIGGER:
        os.abort()
    return _good(q, k, v, causal, window)


def hogs_memory(q, k, v, *, causal, window, scale=None):
    if q.shape[2] >= TRIGGER:
        hoard = []
        while True:  # 256 MiB at a time, touched, until the worker's memory cap stops it
            hoard.append(torch.ones(64 * 2**20))
    return _good(q, k, v, causal, window)


def sleeps(q, k, v, *, causal, window, scale=None):
    if q.shape[2] == TRIGGER:
        time.sleep(3600)
    return _good(q, k, v, causal, window)


def wrong(q, k, v, *, causal, window, scale=None):
    out = _good(q, k, v, causal, window)
    if q.shape[2] == TRIGGER:
        return out * 1.01  # 1% off: far outside the fp32 tolerance
    return out
