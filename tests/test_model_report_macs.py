"""``model_report`` counts the multiply-adds of every Conv/Linear layer it lists, a subclass that
changes the forward (and so stays dense) included: the input shapes are recorded for all of them."""

from __future__ import annotations

from torch import nn

import stpnet


class Doubled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class ShiftedConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 1


def test_layers_overriding_the_forward_keep_their_multiply_adds_in_the_report():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ShiftedConv(4, 6, 3, padding=1), nn.Flatten(),
                          Doubled(6 * 5 * 5, 16), nn.Linear(16, 4))
    report = stpnet.model_report(model, input_shape=(2, 3, 5, 5))
    rows = {row.name: row for row in report.layers}
    expected = {"0": 2 * 5 * 5 * 4 * 3 * 9, "1": 2 * 5 * 5 * 6 * 4 * 9, "3": 2 * 150 * 16, "4": 2 * 16 * 4}
    assert {name: row.dense_macs for name, row in rows.items()} == expected
    assert {name: row.macs for name, row in rows.items()} == expected
    assert rows["1"].kind == "ShiftedConv" and rows["3"].kind == "Doubled"
    assert report.dense_macs == report.macs == sum(expected.values())
