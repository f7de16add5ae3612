"""The maps between a caller's prompt and the model's, against lists built here by walking the prompts."""
from __future__ import annotations

import random

import pytest
import torch

from pruneattn.patch.vlm.layout import CallerView, expand, shorten

IMG, PAD = 9, 0


def _planned_prompts(seed: int):
    """Random planned prompts (left-padded ids), each image's units and its kept units (sorted)."""
    rng = random.Random(seed)
    rows, units, kept = [], [], []
    for r in range(rng.randint(1, 4)):
        row = [rng.randint(1, 8) for _ in range(rng.randint(0, 3))]
        for _ in range(rng.randint(int(r == 0), 3)):  # the first row holds an image at least
            u = rng.randint(1, 9)
            k = sorted(rng.sample(range(u), rng.randint(1, u)))
            units.append(u)
            kept.append(k)
            row += [IMG] * len(k) + [rng.randint(1, 8) for _ in range(rng.randint(0, 2))]
        rows.append(row or [1])
    return rows, units, kept


@pytest.mark.parametrize("seed", range(40))
def test_expand_lays_a_planned_prompt_out_at_full_length(seed):
    rows, units, kept = _planned_prompts(seed)
    L = max(map(len, rows))
    ids = torch.tensor([[PAD] * (L - len(r)) + r for r in rows])
    width = max(len(k) for k in kept)
    kept_t = torch.tensor([k + [-1] * (width - len(k)) for k in kept])
    units_t = torch.tensor(units)
    position, dropped, held = expand(ids == IMG, kept_t, units_t)
    image = 0
    for b, row in enumerate(ids.tolist()):
        full, where, j = [], [], 0
        while j < len(row):  # walk the planned row, writing its full-length layout
            if row[j] != IMG:
                where.append(len(full))
                full.append(("token", row[j]))
                j += 1
                continue
            k = kept[image]
            base = len(full)
            full += [("dropped", u) if u not in k else ("kept", u) for u in range(units[image])]
            where += [base + u for u in k]
            j += len(k)
            image += 1
        assert position[b].tolist() == where
        assert held[b].sum().item() == len(full)
        assert [i for i in range(len(full)) if full[i][0] == "dropped"] == dropped[b].nonzero().flatten().tolist()


@pytest.mark.parametrize("left", [True, False])
def test_a_continuation_maps_onto_the_models_sequence(left):
    """The caller's prompt, then more tokens: the shortened prompt, then the same tokens."""
    full, kept = 4, 1
    rows = [[1, IMG, IMG, IMG, IMG, 2], [3, IMG, IMG, IMG, IMG, 4, IMG, IMG, IMG, IMG, 5, 6]]
    L = max(map(len, rows))
    pad = [[PAD] * (L - len(r)) for r in rows]
    ids = torch.tensor([p + r if left else r + p for p, r in zip(pad, rows)])
    mask = torch.tensor([[0] * len(p) + [1] * len(r) if left else [1] * len(r) + [0] * len(p) for p, r in zip(pad, rows)])
    cut = shorten(ids == IMG, full, kept, 3, mask)
    view = CallerView(cut)
    more = torch.tensor([[7, 8, 9], [7, 8, 9]])
    caller = torch.cat([ids, more], dim=1)
    got = view.to_model(caller, PAD)
    assert torch.equal(got, torch.cat([cut.take(ids, PAD), more], dim=1))
    assert torch.equal(view.to_model(torch.cat([mask, torch.ones_like(more)], 1), 0)[:, -3:], torch.ones_like(more))
    assert view.to_model(caller.repeat_interleave(2, 0), PAD).shape == (4, cut.length + 3)  # beams, returned rows
    with pytest.raises(ValueError, match="shorter than the prompt its cache holds"):
        view.to_model(ids[:, :3], PAD)
    with pytest.raises(ValueError, match="this call has 3 rows, the prompt its cache holds had 2"):
        view.to_model(torch.cat([caller, caller[:1]]), PAD)
