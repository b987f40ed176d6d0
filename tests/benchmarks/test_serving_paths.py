from benchmarks.serving_paths import measure_paths


def test_both_serving_paths_are_timed_on_every_batch_size_and_agree(checkpoint):
    rows = measure_paths(checkpoint, repeats=3, batch_sizes=(1, 64))
    assert [row["batch"] for row in rows] == [1, 64]
    for row in rows:
        assert row["numpy_ms"] > 0 and row["tensorflow_ms"] > 0
        assert row["ratio"] == row["tensorflow_ms"] / row["numpy_ms"]
        assert row["largest_difference"] < 1e-4
