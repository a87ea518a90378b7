"""The features speed benchmark runs end to end on a handful of drawn images."""

from __future__ import annotations

import json

from milbench.bench.features import bench_features_command


def test_bench_table(tmp_path):
    extractors = [
        {"kind": "autoencoder", "name": "conv_ae", "input_size": 32, "latent": 64},
        {"kind": "backbone", "name": "resnet18", "input_size": 32},
    ]
    table = bench_features_command(extractors=extractors, n_images=8, batch_size=4,
                                   num_workers=0, repeats=1, out=tmp_path, print_table=False)
    assert list(table["extractor"]) == ["autoencoder:conv_ae", "backbone:resnet18"]
    assert (table["whole_path_img_s"] > 0).all() and (table["bare_forward_img_s"] > 0).all()
    assert ((table["ratio"] - table["whole_path_img_s"] / table["bare_forward_img_s"]).abs()
            < 1e-9).all()
    assert list(table["dim"]) == [64, 512]
    records = json.loads((tmp_path / "features_bench.json").read_text())
    assert len(records) == 2 and (tmp_path / "features_bench.csv").is_file()
