"""The intervention plan (pipeline.plan) decides ActAdd's sign per prompt set; ``InterventionSpec.build``
applies the sign it is given and nothing else decides one."""

from __future__ import annotations

import pytest
import torch

from refusal_directions.config import build_config
from refusal_directions.directions.diff_in_means import fit_diff_in_means
from refusal_directions.interventions import ActAdd, InterventionSpec, Removal
from refusal_directions.pipeline.plan import (
    INDUCE_REFUSAL, REMOVE_REFUSAL, actadd_sign, build_for_capability, capability_sign, generation_groups,
)

CONFIG, _ = build_config({"eval_datasets": ["jailbreakbench", "advbench"]}, gpu_available=False)
HARMLESS = CONFIG.harmless_eval
ACTADD = InterventionSpec("diff_in_means.actadd-x2", "actadd", method="diff_in_means", pos_index=0, position=-1, layer=1,
                          layers=(1,), coefficient=3.0)
REMOVAL = InterventionSpec("diff_in_means.ablation@all", "removal", method="diff_in_means", pos_index=0, position=-1,
                           layer=1, layers=(0, 1, 2), scope="all")


@pytest.fixture(scope="module")
def sets():
    generator = torch.Generator().manual_seed(0)
    harmful = torch.randn(8, 1, 3, 16, generator=generator) + 1.0
    harmless = torch.randn(8, 1, 3, 16, generator=generator)
    return {"diff_in_means": fit_diff_in_means(harmful, harmless, [-1])}


def test_actadd_subtracts_on_harmful_sets_and_adds_on_the_harmless_set():
    assert (REMOVE_REFUSAL, INDUCE_REFUSAL) == (-1.0, 1.0)
    assert [actadd_sign(ACTADD, d, CONFIG) for d in (*CONFIG.eval_datasets, HARMLESS)] == [-1.0, -1.0, 1.0]
    assert capability_sign(ACTADD) == REMOVE_REFUSAL  # capability metrics and KL: the refusal-removing side
    for spec in (REMOVAL, InterventionSpec("baseline", "baseline")):  # no sign for anything but ActAdd
        assert capability_sign(spec) is None and {actadd_sign(spec, d, CONFIG) for d in (*CONFIG.eval_datasets, HARMLESS)} == {None}


def test_generation_groups_keep_removals_in_one_call_and_split_actadd_by_sign():
    datasets = [*CONFIG.eval_datasets, HARMLESS]
    assert generation_groups(REMOVAL, datasets, CONFIG) == {None: datasets}
    groups = generation_groups(ACTADD, datasets, CONFIG)
    assert groups == {REMOVE_REFUSAL: list(CONFIG.eval_datasets), INDUCE_REFUSAL: [HARMLESS]}
    assert list(groups) == [REMOVE_REFUSAL, INDUCE_REFUSAL]  # the order the datasets come in
    assert generation_groups(ACTADD, [HARMLESS, "advbench"], CONFIG) == {INDUCE_REFUSAL: [HARMLESS], REMOVE_REFUSAL: ["advbench"]}


def test_build_applies_the_sign_it_is_given(sets):
    unit = sets["diff_in_means"].direction[0, 1].float()
    added = ACTADD.build(sets, actadd_sign(ACTADD, HARMLESS, CONFIG))
    subtracted = ACTADD.build(sets, actadd_sign(ACTADD, "jailbreakbench", CONFIG))
    assert isinstance(added, ActAdd) and added.layer == 1
    assert torch.equal(added.vector, 3.0 * unit) and torch.equal(subtracted.vector, -3.0 * unit)
    assert torch.equal(build_for_capability(ACTADD, sets).vector, subtracted.vector)
    with pytest.raises(ValueError, match="needs its sign"):
        ACTADD.build(sets)  # ActAdd without a sign is refused, never guessed
    removal = build_for_capability(REMOVAL, sets)
    assert isinstance(removal, Removal) and removal.layers == [0, 1, 2]
    assert ACTADD.to_dict()["coefficient"] == 3.0  # plan.json keeps |c|: the sign is not part of the spec

