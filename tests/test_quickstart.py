"""The README's main example keeps working: loss falls, merged == unmerged."""

from examples import quickstart


def test_quickstart_runs_end_to_end():
    result = quickstart.main(pretrain_steps=40, lora_steps=40)
    assert result["last_loss"] < result["first_loss"]
    assert result["merge_max_diff"] < 1e-4
