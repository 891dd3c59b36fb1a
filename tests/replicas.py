"""Test machinery: the proof that every process of a torchrun job holds the same teacher and
prototypes. As a script it runs train.py's main with check_replicas_equal after every
evaluation: `torchrun ... tests/replicas.py FLAGS` (tests/test_distributed.py)."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402


def bit_checksum(tensor):
    """(2,) int64: sum of the tensor's bit patterns b_i (floats read as integers of the
    same width), plain and weighted by position: [sum_i b_i, sum_i b_i (i mod 1021 + 1)].
    Integer sums are exact in any order (wrapping on overflow), so equal tensors give
    equal checksums whatever the thread count; a float sum would not."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype.is_floating_point:
        flat = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    flat = flat.long()
    position = torch.arange(len(flat), device=flat.device) % 1021 + 1
    return torch.stack([flat.sum(), (flat * position).sum()])


@torch.no_grad()
def check_replicas_equal(teacher, bank, ctx):
    """Raise naming the first tensor of the teacher (parameters and BN statistics) or the
    prototypes that differs between processes: all-gather one (T, 2) checksum tensor."""
    if ctx.world == 1 or (teacher is None and bank is None):
        return
    named = [] if teacher is None else [("teacher." + k, v) for k, v in teacher.state_dict().items()]
    if bank is not None:
        named.append(("prototypes", bank.prototypes))
    checksums = torch.stack([bit_checksum(v) for _, v in named])  # (T, 2)
    gathered = [torch.empty_like(checksums) for _ in range(ctx.world)]
    dist.all_gather(gathered, checksums)
    for rank, other in enumerate(gathered):
        differs = (other != gathered[0]).any(dim=1).tolist()
        if any(differs):
            raise RuntimeError(
                f"replicas: process {rank} holds a different {named[differs.index(True)][0]} "
                f"than process 0 (and {sum(differs)} tensor(s) differ in all); the processes "
                f"should hold identical copies")
    what = " and ".join(n for n, present in (("teacher", teacher), ("prototypes", bank))
                        if present is not None)
    ctx.log(f"replicas: {what} identical on {ctx.world} processes")


def checked_evaluation(student, teacher, bank, data, cfg, ctx, semi):
    results = evaluate(student, teacher, bank, data, cfg, ctx, semi)
    check_replicas_equal(teacher, bank, ctx)
    return results


if __name__ == "__main__":
    evaluate, train.run_evaluation = train.run_evaluation, checked_evaluation
    train.exit_process(train.main(sys.argv[1:]))
