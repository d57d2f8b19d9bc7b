"""pytest-benchmark comparisons: rows are collected during the session and
written to bench/results/<device>-<date>.json at its end (see common.record)."""
import sys

import pytest
import torch

import common


class Results:
    def __init__(self):
        self.rows, self.absent = [], {}


@pytest.fixture(scope="session")
def results():
    collected = Results()
    yield collected
    if collected.rows or collected.absent:
        largest = max((row["numel"] * common.update_bytes_per_element(torch.float32)
                       for row in collected.rows), default=None)
        path = common.record(collected.rows, collected.absent,
                             copy_gbps=largest and common.copy_bandwidth_gbps(largest),
                             command="pytest " + " ".join(sys.argv[1:]))
        print(f"\nbenchmark results: {path}")
