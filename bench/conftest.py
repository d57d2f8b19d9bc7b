"""pytest-benchmark comparisons: each row is merged into
bench/results/<device>-<date>.json as soon as it is measured (see
common.record), so a run that is cut short keeps every finished row."""
import sys

import pytest
import torch

import common


class Results:
    def __init__(self):
        self.rows, self.absent = [], {}
        self.command = "pytest " + " ".join(sys.argv[1:])

    def add(self, row):
        self.rows.append(row)
        common.record([row], command=self.command)

    def add_absent(self, impl, reason):
        if impl not in self.absent:
            self.absent[impl] = reason
            common.record([], {impl: reason}, command=self.command)


@pytest.fixture(scope="session")
def results():
    collected = Results()
    yield collected
    if collected.rows:
        largest = max(row["numel"] * common.update_bytes_per_element(torch.float32) for row in collected.rows)
        path = common.record([], copy_gbps=common.copy_bandwidth_gbps(largest), command=collected.command)
        print(f"\nbenchmark results: {path}")
