"""`sigma-repro bench reparam` on a tiny ViT: the JSON record's structure and arithmetic."""

import argparse
import json
import statistics

import pytest
import torch

from sigma_repro import bench
from sigma_repro.errors import ConfigError
from sigma_repro.reparam import apply_sigma_reparam


def parse(*argv):
    parser = argparse.ArgumentParser(prog="sigma-repro bench")
    bench.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def assert_timed_pairs(record: dict, *, batch_sizes: list[int], repeats: int) -> None:
    """Each batch size's plain and σReparam timings: ``repeats`` positive samples a kind, their
    medians, and the ratios of those medians."""
    assert [r["batch_size"] for r in record["results"]] == batch_sizes
    for result in record["results"]:
        for name in ("plain", "reparam"):
            for kind in ("wall_s", "process_s"):
                samples = result[name]["samples"][kind]
                assert len(samples) == repeats and all(t > 0 for t in samples)
                assert result[name][kind] == statistics.median(samples)
        for kind in ("wall_s", "process_s"):
            assert result["ratio"][kind] == result["reparam"][kind] / result["plain"][kind]


def test_reparam_bench_writes_consistent_record(tmp_path, capsys, restore_threads):
    out = tmp_path / "bench" / "reparam.json"
    args = parse("reparam", "--model", "vit_tiny", "--depth", "2", "--img-size", "32", "--batch-sizes", "2,3",
                 "--repeats", "2", "--warmup", "1", "--threads", "1", "--out", str(out))
    assert bench.run(args) == 0
    record = json.loads(out.read_text())

    assert record["benchmark"] == "reparam"
    assert record["config"]["batch_sizes"] == [2, 3] and record["config"]["img_size"] == 32
    machine = record["machine"]
    for key in ("cpu_model", "cpu_cores", "torch_version", "device_name", "date", "git_sha", "command"):
        assert key in machine
    assert machine["torch_version"] == torch.__version__ and machine["torch_threads"] == 1
    assert_timed_pairs(record, batch_sizes=[2, 3], repeats=2)
    table = capsys.readouterr().out
    assert "reparam wall s" in table and f"wrote {out}" in table


def test_reparam_bench_applies_and_records_power_iters(tmp_path, monkeypatch, restore_threads):
    applied = []

    def recording_apply(model, **options):
        applied.append(options)
        return apply_sigma_reparam(model, **options)

    monkeypatch.setattr(bench, "apply_sigma_reparam", recording_apply)
    out = tmp_path / "reparam.json"
    args = parse("reparam", "--model", "vit_tiny", "--depth", "1", "--img-size", "16", "--batch-sizes", "1",
                 "--repeats", "1", "--warmup", "0", "--threads", "1", "--power-iters", "3", "--out", str(out))
    assert bench.run(args) == 0
    assert applied == [{"qkv": "fused", "power_iters": 3}]
    assert json.loads(out.read_text())["config"]["power_iters"] == 3


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        parse("reparam", "--batch-sizes", "4,0")
    with pytest.raises(SystemExit):
        parse("reparam", "--model", "vit_huge")
    with pytest.raises(SystemExit):
        parse()  # a benchmark name is required
    with pytest.raises(ConfigError, match="repeats"):
        bench.run(parse("reparam", "--repeats", "0"))
    with pytest.raises(ConfigError, match="--power-iters must be >= 1"):
        bench.run(parse("reparam", "--power-iters", "0"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_a_device_is_a_config_error():
    with pytest.raises(ConfigError, match="--device cpu"):
        bench.run(parse("reparam", "--device", "cuda"))
