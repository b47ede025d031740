"""Is ppo.py's update on frames the usual PPO update? One update (K epochs of minibatch steps) by
`ppo.ppo_update`, with what surrounds the loss there (the minibatch moments, gradient clipping, fused Adam;
here on one rank, so no gradient averaging, and with every transition valid), against a plain loop in the
form CleanRL's ppo_atari.py runs, without its value clipping (ppo.py's default is off): the same start
weights, the same batch (random frames, actions sampled from the start policy, random advantages), the same
minibatch order, the CNN in float32. The plain loop's hyperparameters are written out below, not read from
ppo.py, so a wrong frame default in ppo.py fails too.

The two can only agree to float noise: Adam's first steps divide by |g|, so where a gradient is near zero its
sign, and so the step, follows rounding. To size that noise the plain loop also runs a second time from
start weights moved by one float32 step each (to the next float up): a rounding-sized change. If ppo.py's
update differs from the plain loop by no more than the plain loop differs from itself, the update is that
loop. The floor is one sample and coarse (0.1-7% of a parameter's step): an error smaller than that, such as a
slightly wrong loss scale, which Adam mostly divides away, would not show. Exit code 1 when ppo.py's distance
is over twice the noise's (a flipped entropy sign gave 9.3x, a doubled clip range 20.8x; ppo.py 0.77x).

    python benchmarks/update_vs_plain_loop.py
"""
import copy
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ppo  # noqa: E402

N, SHAPE, ACTIONS = 1024, (4, 84, 84), 6  # one Atari rollout: 8 envs x 128 steps, Pong's 6 actions
# The Atari PPO settings, as CleanRL's ppo_atari.py sets them
LR, EPOCHS, MINIBATCHES, CLIP, ENT, VF, MAX_GRAD_NORM = 2.5e-4, 4, 4, 0.1, 0.01, 0.5, 0.5


def plain_ppo_update(agent, batch, perms):
    """K epochs; each a shuffle into minibatches; each minibatch one Adam step on
    -min(r A, clip(r, 1-eps, 1+eps) A) + c_v 0.5 (V - R)^2 - c_e H, A normalised in the minibatch."""
    optimizer = torch.optim.Adam(agent.parameters(), lr=LR, eps=1e-5)
    size = N // MINIBATCHES
    for perm in perms:
        for start in range(0, N, size):
            mb = perm[start:start + size]
            logp = torch.log_softmax(agent.logits(batch.obs[mb]), -1)
            new_logprob = logp.gather(-1, batch.actions[mb, None]).squeeze(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            value = agent.get_value(batch.obs[mb])
            ratio = torch.exp(new_logprob - batch.logprobs[mb])
            adv = batch.advantages[mb]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - CLIP, 1 + CLIP) * adv).mean()
            value_loss = 0.5 * ((value - batch.returns[mb]) ** 2).mean()
            loss = policy_loss + VF * value_loss - ENT * entropy.mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(agent.parameters(), MAX_GRAD_NORM)
            optimizer.step()


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = ppo.Agent(SHAPE, ACTIONS)  # bf16 stays off: float32, as the plain loop
    args = ppo.with_defaults(ppo.Args(env_id="PongNoFrameskip-v4"), frames=True)
    obs = torch.randint(0, 256, (N,) + SHAPE, dtype=torch.uint8)
    with torch.no_grad():
        policies = torch.log_softmax(start.logits(obs), -1)
        values = start.get_value(obs)
    actions = torch.distributions.Categorical(logits=policies).sample()
    advantages = torch.randn(N)
    batch = ppo.Batch(obs, actions, policies.gather(-1, actions[:, None]).squeeze(-1), values, advantages,
                      advantages + values, valid=torch.arange(N), policies=policies)
    perms = [torch.randperm(N) for _ in range(EPOCHS)]

    ours = copy.deepcopy(start)
    orders = iter(perms)
    def randperm(n, device=None):  # ppo_update's shuffles, one per epoch: the plain loop's
        assert n == N
        return next(orders)
    ppo.torch.randperm, real_randperm = randperm, ppo.torch.randperm
    try:
        ppo.ppo_update(ours, torch.optim.Adam(ours.parameters(), lr=args.learning_rate, eps=1e-5, fused=True),
                       batch, args, ppo.Ranks())
    finally:
        ppo.torch.randperm = real_randperm
    assert next(orders, None) is None, "ppo_update ran fewer epochs than the plain loop"
    plain, plain_again = copy.deepcopy(start), copy.deepcopy(start)
    plain_ppo_update(plain, batch, perms)
    with torch.no_grad():
        for p in plain_again.parameters():
            p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    plain_ppo_update(plain_again, batch, perms)

    print("|θ - θ_plain| / |θ_plain - θ_start|, per parameter")
    print(f"{'parameter':18s} {'ppo.py':>10s} {'plain, 1 ulp off':>18s}")
    worst = []
    for (name, p0), p, q, q2 in zip(start.named_parameters(), ours.parameters(), plain.parameters(),
                                     plain_again.parameters()):
        step = (q - p0).norm()
        ours_off, noise = ((p - q).norm() / step).item(), ((q2 - q).norm() / step).item()
        worst.append(ours_off / noise)
        print(f"{name:18s} {ours_off:10.2e} {noise:18.2e}")
    print(f"ppo.py's distance over the noise's: at most {max(worst):.2f}x (median {np.median(worst):.2f}x)")
    sys.exit(1 if max(worst) > 2 else 0)


if __name__ == "__main__":
    main()
