"""An independent reference for activation patching: plain PyTorch forward hooks, one unpadded prompt per run.

It shares no code with clap's engine: module paths are given explicitly by the tests, prompts are run one at a
time without padding, and the metrics are computed by hand from the final logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _hook(module: torch.nn.Module, access: str, edit: Callable[[torch.Tensor], torch.Tensor]):
    """Install a hook that passes the module's input (or output) tensor through ``edit``."""
    if access == "input":

        def pre(_mod, args, kwargs):
            if args:
                return (edit(args[0]), *args[1:]), kwargs
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            kwargs = dict(kwargs)
            kwargs[key] = edit(kwargs[key])
            return args, kwargs

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_mod, _args, output):
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    return module.register_forward_hook(post)


def run(model: torch.nn.Module, ids: Sequence[int], patches=()) -> torch.Tensor:
    """Final-position logits of one unpadded prompt with ``patches`` = [(module path, access, edit)]."""
    handles = [_hook(model.get_submodule(path), access, edit) for path, access, edit in patches]
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([list(ids)])).logits[0, -1].float()
    finally:
        for handle in handles:
            handle.remove()


def capture(model: torch.nn.Module, ids: Sequence[int], path: str, access: str) -> torch.Tensor:
    store = {}

    def keep(x):
        store["x"] = x.detach().clone()
        return x

    run(model, ids, [(path, access, keep)])
    return store["x"][0]  # [seq, width]


def replace_edit(values: torch.Tensor, positions: Sequence[int], head: int | None, n_heads: int | None):
    """Edit that writes ``values[k]`` (width or head_dim) at ``positions[k]``."""

    def edit(x):
        x = x.clone()
        for k, pos in enumerate(positions):
            if head is None:
                x[0, pos] = values[k]
            else:
                d = x.shape[-1] // n_heads
                x[0, pos, head * d : (head + 1) * d] = values[k]
        return x

    return edit


def source_values(act: torch.Tensor, positions: Sequence[int], head: int | None, n_heads: int | None) -> torch.Tensor:
    rows = act[list(positions)]
    if head is None:
        return rows
    d = act.shape[-1] // n_heads
    return rows[:, head * d : (head + 1) * d]


def metrics(logits: torch.Tensor, answer: Sequence[int], wrong: Sequence[int], clean_logits: torch.Tensor) -> dict:
    logprobs = torch.log_softmax(logits, -1)
    clean_lp = torch.log_softmax(clean_logits, -1)
    answer_logit = logits[list(answer)].mean()
    prob = logprobs[list(answer)].exp().sum()
    return {
        "logit_diff": float(answer_logit - logits[list(wrong)].mean()) if wrong else float("nan"),
        "logit": float(answer_logit),
        "prob": float(prob),
        "logprob": float(torch.log(prob)),
        "kl": float((clean_lp.exp() * (clean_lp - logprobs)).sum()),
    }


# -- composed interventions: noise, restores, windows, steering, interpolation --------------------------------------


def seed_of(key: str) -> int:
    """The documented noise seed: the first 15 hex digits of sha256(key) as an integer."""
    import hashlib

    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


def gaussian(key: str, n: int, width: int, std: float) -> torch.Tensor:
    return torch.randn((n, width), generator=torch.Generator().manual_seed(seed_of(key))) * std


def add_edit(values: torch.Tensor, positions: Sequence[int]):
    """Edit that adds ``values[k]`` at ``positions[k]``."""

    def edit(x):
        x = x.clone()
        for k, pos in enumerate(positions):
            x[0, pos] = x[0, pos] + values[k]
        return x

    return edit


def mix_edit(source: torch.Tensor, positions: Sequence[int], alpha: float):
    """Edit that moves the activation at ``positions`` a fraction ``alpha`` towards ``source[pos]``."""

    def edit(x):
        x = x.clone()
        for pos in positions:
            x[0, pos] = x[0, pos] + alpha * (source[pos] - x[0, pos])
        return x

    return edit


def subject_indices(tokenizer, prompt: str, subject: str) -> list[int]:
    """Token indices of the tokens of ``prompt`` whose text overlaps ``subject``'s characters; a token's characters
    are found by decoding the prompt's tokens up to it (tokenising the text before the subject alone would split
    " epilepsy" into " " + "epilepsy" where the subject has no leading space)."""
    ids = tokenizer(prompt)["input_ids"]
    start = prompt.index(subject)
    end = start + len(subject)
    out, previous = [], 0
    for i in range(len(ids)):
        upto = len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True))
        if upto > previous and previous < end and upto > start:
            out.append(i)
        previous = upto
    return out


def answer_prob(logits: torch.Tensor, answer: Sequence[int]) -> float:
    return float(torch.softmax(logits.double(), -1)[list(answer)].sum())


def probe_ids(model, probe: dict) -> tuple[list[int], list[int], list[int], list[int]]:
    """Token ids of a probe's clean and corrupted prompts and of its (single-string) answer and wrong answer."""
    tok = model.tokenizer
    return (tok(probe["clean"])["input_ids"], tok(probe["corrupted"])["input_ids"],
            tok(probe["answer"], add_special_tokens=False)["input_ids"],
            tok(probe["wrong"], add_special_tokens=False)["input_ids"])


def hook_logit_diff(model, probe: dict, patches_for) -> float:
    """Reference: patches_for(clean_ids, corrupted_ids) -> [(path, access, edit)] applied to the corrupted prompt."""
    clean, corrupted, answer, wrong = probe_ids(model, probe)
    logits = run(model.hf, corrupted, patches_for(clean, corrupted))
    return float(logits[answer].mean() - logits[wrong].mean())
