"""The mtGAN-style adversarial stage of the note model (dpsynth.models.text_adv; issue 7, requirement 6)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dpsynth.data.notes import render_notes
from dpsynth.models.dp import make_private
from dpsynth.models.text import (
    EOS,
    PAD,
    NoteLM,
    NoteTokenizer,
    TextConfig,
    sample_note_ids,
    sample_notes,
)
from dpsynth.models.text_adv import (
    AdversarialConfig,
    NoteCritic,
    critic_loss,
    reinforce_step,
)

SMALL = TextConfig(d_model=32, heads=4, layers=1, max_len=64, cond_dropout=0.0)


@pytest.fixture(scope="module")
def tok(schema):
    return NoteTokenizer.from_schema(schema, max_len=SMALL.max_len)


@pytest.fixture(scope="module")
def ids(tok, train_df):
    df = train_df.iloc[:64]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation: the short max_len cuts the notes
        return torch.from_numpy(tok.encode(df, render_notes(df, seed=0)).ids)


def test_the_critic_clips_each_patients_real_and_generated_note_together(tok, ids):
    """The streams (real, generated) are folded into one row per patient: Opacus' per-sample gradient of row i
    is exactly the gradient of patient i's pair alone, so clipping bounds what the patient contributes."""
    torch.manual_seed(0)
    B = 6
    real, fake = ids[:B], ids[B : 2 * B]
    critic = NoteCritic(tok.vocab_size, tok.prefix_len, d=16, hidden=8)
    ref = copy.deepcopy(critic)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=B)
    m, _, _, _ = make_private(module=critic, optimizer=torch.optim.SGD(critic.parameters(), lr=0.1), criterion=None,
                              loader=loader, noise_multiplier=0.0, max_grad_norm=1e6, noise_generator=None,
                              grad_sample_mode="hooks")
    critic_loss(m, real, fake).mean().backward()  # loss_reduction "mean": Opacus rescales each row by B
    for i in range(B):
        ref.zero_grad()
        critic_loss(ref, real[i : i + 1], fake[i : i + 1]).sum().backward()
        for (name, p), q in zip(critic.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad_sample[i], q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # and the pair matters: swapping in another patient's generated note changes row 0's gradient
    ref.zero_grad()
    critic_loss(ref, real[:1], fake[1:2]).sum().backward()
    assert not torch.allclose(critic.out.weight.grad_sample[0], ref.out.weight.grad)


LOWER = (ord("a"), ord("z") + 1)


class _LikesLetters(nn.Module):
    """A stand-in critic: "real" the more of a note's tokens are lower-case letters."""

    def __init__(self, prefix_len: int):
        super().__init__()
        self.prefix_len = prefix_len

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        note = ids[:, :, self.prefix_len :]
        used = (note != PAD) & (note != EOS)
        frac = ((note >= LOWER[0]) & (note < LOWER[1]) & used).sum(-1) / used.sum(-1).clamp(min=1)
        return 20.0 * (frac - 0.1)


def _letter_mass(model: NoteLM, ids: torch.Tensor) -> float:
    with torch.no_grad():
        p = torch.softmax(model.logits(ids), -1)
    return float(p[..., LOWER[0] : LOWER[1]].sum(-1).mean())


def test_reinforce_moves_the_generator_toward_what_the_critic_calls_real(tok, ids, train_df):
    torch.manual_seed(1)
    gen = NoteLM.for_tokenizer(tok, SMALL)
    cond = tok.encode_condition(train_df.iloc[:48])
    sampled = sample_note_ids(gen, tok, cond[:4], temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    # the training layout: BOS, condition, SEP, then note tokens that decode as sample_notes does
    assert sampled.shape == (4, tok.max_len) and torch.equal(sampled[:, 1 : tok.prefix_len - 1], torch.as_tensor(cond[:4]))
    assert [tok.decode(r) for r in sampled.tolist()] == sample_notes(
        gen, tok, cond[:4], temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    before = _letter_mass(gen, ids[:16])
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
    rng = torch.Generator().manual_seed(2)
    rewards = [reinforce_step(gen, _LikesLetters(tok.prefix_len), tok, cond, opt, rng)["reward"] for _ in range(12)]
    after = _letter_mass(gen, ids[:16])
    assert after > before + 0.15, (before, after)
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3])


def test_adversarial_config_guard_rails():
    with pytest.raises(ValueError, match="share"):
        AdversarialConfig(share=1.0)
    with pytest.raises(ValueError, match="steps"):
        AdversarialConfig(steps=0)
