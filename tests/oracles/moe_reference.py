"""Mesh-TensorFlow 0.1.18's `transformer_moe_layer_v1` re-stated in NumPy (float64).

Written from the algorithm's description (reference section 1.2), sharing no code with the
library, and in the other formulation: a plain loop over tokens (first choices in token
order fill the experts, then second choices), where the library uses cumsums and one-hot
einsums. Random choices are injected (`uniforms`), so the library's can be compared.
"""

import numpy as np


def split_into_groups(n, max_group_size, mesh_dim_size):
    assert n % mesh_dim_size == 0
    groups = max(1, n // max_group_size)
    while groups % mesh_dim_size != 0 or n % groups != 0:
        groups += 1
    return groups, n // groups


def capacity_of(group_size, experts, factor, minimum):
    return max(min(group_size, int(group_size * factor / experts)), minimum)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ffn(x, wi, wo, act):
    return act(x @ wi) @ wo


def relu(x):
    return np.maximum(x, 0.0)


def top2_group(gates, capacity, policy, threshold, uniforms, second_place_loss):
    """One group: gates [S, E] -> (assignments [(token, expert, weight)], aux, requested)."""
    size, experts = gates.shape
    first, second = [], []
    for s in range(size):
        order = sorted(range(experts), key=lambda e: (-gates[s, e], e))  # ties: lowest index
        e1, e2 = order[0], order[1]
        g1, g2 = gates[s, e1], gates[s, e2]
        denom = g1 + g2 + 1e-9
        first.append((e1, g1 / denom))
        second.append((e2, g2 / denom))
    density = np.zeros(experts)
    for e1, _ in first:
        density[e1] += 1.0 / size
    aux = float(np.mean(density * gates.mean(0)) * experts * experts)
    if second_place_loss:
        density_2 = np.zeros(experts)
        proxy_2 = np.zeros(experts)
        for s, (e2, _) in enumerate(second):
            density_2[e2] += 1.0 / size
            rest = gates[s].copy()
            rest[first[s][0]] = 0.0
            proxy_2 += rest / (rest.sum() + 1e-9) / size
        aux += 0.5 * float(np.mean(density_2 * proxy_2) * experts * experts)

    def wanted(s):
        g2 = second[s][1]
        if policy == "all":
            return True
        if policy == "none":
            return False
        if policy == "threshold":
            return g2 > threshold
        return uniforms[s] < g2 / max(threshold, 1e-9)  # random

    taken = np.zeros(experts, int)
    assignments, requested = [], 0
    for s, (e1, g1) in enumerate(first):
        requested += 1
        if taken[e1] < capacity:
            assignments.append((s, e1, g1))
        taken[e1] += 1
    taken = np.minimum(taken, capacity)  # second choices queue after the kept first choices
    for s, (e2, g2) in enumerate(second):
        if not wanted(s):
            continue
        requested += 1
        if taken[e2] < capacity:
            assignments.append((s, e2, g2))
        taken[e2] += 1
    return assignments, aux, requested


def top1_group(gates, capacity):
    size, experts = gates.shape
    density = np.zeros(experts)
    taken = np.zeros(experts, int)
    assignments = []
    for s in range(size):
        e = int(np.argmax(gates[s]))
        density[e] += 1.0 / size
        if taken[e] < capacity:
            assignments.append((s, e, gates[s, e]))
        taken[e] += 1
    aux = float(np.mean(density * gates.mean(0)) * experts * experts)
    return assignments, aux, size


def moe_layer(
    x,
    router,
    wi,
    wo,
    *,
    gating="top_2",
    group_size,
    mesh_dim_size=1,
    capacity_factor,
    min_capacity=1,
    policy="all",
    threshold=0.2,
    uniforms=None,
    second_place_loss=False,
    act=relu,
):
    """x [B, L, M] -> (y [B, L, M], mean aux loss over groups, dropped fraction)."""
    b, length, m = x.shape
    experts = router.shape[1]
    groups, size = split_into_groups(b * length, group_size, mesh_dim_size)
    capacity = capacity_of(size, experts, capacity_factor, min_capacity)
    tokens = np.asarray(x, np.float64).reshape(groups, size, m)
    y = np.zeros_like(tokens)
    auxes, requested, kept = [], 0, 0
    for g in range(groups):
        gates = softmax(tokens[g] @ router)
        if gating == "top_2":
            u = None if uniforms is None else uniforms[g]
            assignments, aux, wants = top2_group(
                gates, capacity, policy, threshold, u, second_place_loss
            )
        else:
            assignments, aux, wants = top1_group(gates, capacity)
        for s, e, weight in assignments:
            y[g, s] += weight * ffn(tokens[g, s], wi[e], wo[e], act)
        auxes.append(aux)
        requested += wants
        kept += len(assignments)
    return y.reshape(b, length, m), float(np.mean(auxes)), 1.0 - kept / requested
