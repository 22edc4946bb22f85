"""The consistency losses (shared by training and the metrics)."""

from __future__ import annotations

import torch

from sae_lens_hierarchical.losses import consistency_kl, consistency_l2
from sae_lens_hierarchical.tree import fixed_parents


def test_l2_is_the_parents_gap_to_its_childrens_sum_where_a_child_fires():
    parent = torch.tensor([-1, -1, 0, 0, 1])
    acts = torch.tensor([[2.0, 0.0, 1.0, 0.5, 0.0],    # p0 on, children 1.5: (2 - 1.5)^2
                         [0.0, 3.0, 0.0, 0.0, 0.0],    # p1 on, no child on: not counted
                         [0.0, 0.0, 0.0, 0.0, 2.0]])   # child of p1 on, p1 off: pre 0.5 -> (0.5 - 2)^2
    pre = torch.tensor([[2.0, -1.0, 1.0, 0.5, -3.0],
                        [-1.0, 3.0, -2.0, -2.0, -1.0],
                        [-4.0, 0.5, -1.0, -1.0, 2.0]])
    want = ((2 - 1.5) ** 2 + (0.5 - 2.0) ** 2) / 3
    torch.testing.assert_close(consistency_l2(acts, pre, parent), torch.tensor(want))


def test_l2_pulls_an_absent_parent_on_where_its_child_fires():
    parent = torch.tensor([-1, 0])
    acts = torch.tensor([[0.0, 2.0]])
    pre = torch.tensor([[-0.5, 2.0]], requires_grad=True)
    consistency_l2(acts, pre.relu() * 0 + pre, parent).backward()
    assert pre.grad[0, 0] == 0  # relu(-0.5) = 0: no gradient below zero...
    pre2 = torch.tensor([[0.3, 2.0]], requires_grad=True)
    consistency_l2(acts, pre2, parent).backward()
    assert pre2.grad[0, 0] < 0  # ...but a weak parent is pushed up towards its child's 2.0


def test_l2_without_children_grad_moves_only_the_parent():
    parent = torch.tensor([-1, 0])
    pre = torch.tensor([[0.3, 2.0]])
    grads = {}
    for children_grad in (True, False):
        acts = torch.tensor([[0.0, 2.0]], requires_grad=True)
        pre_p = pre.clone().requires_grad_(True)
        loss = consistency_l2(acts, pre_p, parent, children_grad=children_grad)
        loss.backward()
        child_grad = 0.0 if acts.grad is None else acts.grad[0, 1].item()
        grads[children_grad] = (child_grad, pre_p.grad[0, 0].item())
        torch.testing.assert_close(loss, torch.tensor((0.3 - 2.0) ** 2))  # the same value either way
    assert grads[True][0] > 0  # descent pushes the child down towards its weaker parent...
    assert grads[False][0] == 0  # ...only while its gradient flows
    assert grads[True][1] == grads[False][1] < 0  # the parent is pulled up in both


def test_one_sided_l2_leaves_a_parent_stronger_than_its_children_alone():
    parent = torch.tensor([-1, -1, 0, 0, 1])
    acts = torch.tensor([[2.0, 0.0, 1.0, 0.5, 0.0],    # p0 2 above its children's 1.5: free
                         [0.0, 0.0, 0.0, 0.0, 2.0]])   # p1 at 0.5 under its child's 2: (2 - 0.5)^2
    pre = torch.tensor([[2.0, -1.0, 1.0, 0.5, -3.0],
                        [-4.0, 0.5, -1.0, -1.0, 2.0]], requires_grad=True)
    loss = consistency_l2(acts, pre, parent, one_sided=True)
    torch.testing.assert_close(loss, torch.tensor((2.0 - 0.5) ** 2 / 2))
    loss.backward()
    assert pre.grad[0, 0] == 0 and pre.grad[1, 1] < 0  # only the weak parent is pulled (up)
    # the two-sided form also pushes the strong parent down towards 1.5
    two_sided = consistency_l2(acts, pre.detach(), parent)
    torch.testing.assert_close(two_sided, torch.tensor(((2 - 1.5) ** 2 + (0.5 - 2.0) ** 2) / 2))


def test_kl_is_zero_when_children_carry_their_parents_mass_and_positive_otherwise():
    widths = [4, 16, 64]
    parent = fixed_parents(widths)
    consistent = torch.zeros(3, 84)
    consistent[:, :4] = torch.tensor([1.0, 2.0, 0.0, 3.0])
    consistent[:, 4:20] = consistent[:, :4].repeat_interleave(4, -1) / 4
    consistent[:, 20:] = consistent[:, 4:20].repeat_interleave(4, -1) / 4
    assert consistency_kl(consistent, parent, None).item() < 1e-5
    consistent[:, 4] += 5.0
    assert consistency_kl(consistent, parent, None).item() > 0.1


def test_no_edges_give_a_zero_that_is_still_attached():
    acts = torch.rand(4, 6, requires_grad=True)
    pre = torch.rand(4, 6, requires_grad=True)
    none = torch.full((6,), -1)
    out = consistency_l2(acts, pre, none)
    assert out.item() == 0.0 and out.requires_grad
