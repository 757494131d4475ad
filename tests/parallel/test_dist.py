"""parallel/dist.py in one process: the agreement's single-rank behaviour, the one line it carries for a failure,
the LOCAL group. Its collective behaviour (every rank raises the same RankError naming the failing rank) is tested
through the real launcher at TP=2: tests/test_faults.py, tests/workflows/test_load.py (an FP8 folder of another
model on rank 1 only)."""

import pytest

from ds_quant.errors import CheckpointError, ConfigError, DsQuantError, MeasurementError, RankError
from ds_quant.parallel import dist


def test_alone_agree_returns_the_result_and_lets_the_error_itself_through():
    def fail():
        raise MeasurementError("stats.json: not found")

    assert dist.agree(lambda: 41 + 1, dist.LOCAL) == 42
    with pytest.raises(MeasurementError, match="^stats.json: not found$"):  # unchanged: not wrapped in a RankError
        dist.agree(fail, dist.LOCAL, what="QUANTIZE")


@pytest.mark.parametrize("error", [ConfigError("cfg.json: key 'mode': 'X'"), CheckpointError("f: truncated"),
                                   RankError("QUANTIZE: rank 1: f"), MeasurementError("m.json: not valid JSON")])
def test_our_errors_travel_as_their_message_alone(error):
    assert isinstance(error, DsQuantError)
    assert dist._one_line(error) == str(error)


def test_other_errors_keep_their_type_name():
    assert dist._one_line(KeyError("w")) == "KeyError: 'w'"
    assert dist._one_line(OSError("disk full")) == "OSError: disk full"


def test_a_model_that_is_not_tensor_parallel_talks_to_no_one():
    assert dist.talk_group(object(), 1) is dist.LOCAL
    group = object()
    assert dist.talk_group(group, 2) is group
    assert dist.group_size(dist.LOCAL) == 1 and dist.group_rank(dist.LOCAL) == 0
    assert dist.all_gather_objects({"a": 1}, dist.LOCAL) == [{"a": 1}]
    assert dist.broadcast_object("run-id", 0, dist.LOCAL) == "run-id"
