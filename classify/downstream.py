"""Downstream classifiers of `make fairgen`: trained on real + synthetic images, tested on real images by group.

Four kinds (FairGen's downstream set, small enough for a CPU at quick scale):
    vit        the small ViT of classify/nets.py, from scratch
    resnet50   torchvision ResNet-50 (ImageNet weights with --pretrained on a user's machine; from scratch here)
    gb         scikit-learn HistGradientBoostingClassifier on 50 PCA components of the pixels
    knn        scikit-learn k-nearest neighbours (k = 15, distance-weighted) on the same PCA components
Adaptive inverse-performance reweighting (FairGen code; docs/METHODS.md), --reweight: in epoch 0 every sample has
weight 1; before epoch e each sensitive group s gets w_s = (1 / (Acc_s + 1e-6)) normalised, Acc_s its validation
accuracy (%) after epoch e-1, and the epoch's samples are drawn with replacement with w_s(i). For gb, one
reweighted refit after a first fit (sample_weight); knn has no training loop and is never reweighted.
The networks keep the weights of their best validation accuracy.
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F

from classify.nets import build

KINDS = ["vit", "resnet50", "gb", "knn"]


def inverse_performance_weights(group_acc, eps=1e-6):
    """Adaptive inverse-performance reweighting (downstream; FairGen code): w~_s = 1 / (Acc_s + eps) with Acc_s the
    validation accuracy (%) of group s; w_s = w~_s / sum w~. group_acc: {group: accuracy in %}."""
    raw = {g: 1.0 / (a + eps) for g, a in group_acc.items()}
    total = sum(raw.values())
    return {g: v / total for g, v in raw.items()}


def _group_acc(y, pred, groups):
    return {g: 100.0 * float(np.mean(pred[groups == g] == y[groups == g])) for g in np.unique(groups)}


def adamw(params, lr, weight_decay, fused=False):
    """AdamW; fused: its fused kernel (one per parameter tensor instead of several; the ViT's many small tensors step
    about 1.1x faster with it). Torch before 2.4 refuses it for CPU tensors when the optimizer is built, and then
    the plain AdamW is used; later versions have it for CPUs and GPUs, the only devices here."""
    params = list(params)
    if fused:
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError):  # an older torch: no fused kernel for this device, or no such argument
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _fit_net(kind, tr, val, n_classes, epochs, reweight, seed, device, pretrained=False, vit=None, batch_size=64,
             lr=1e-3):
    x, y, g = tr
    xv, yv, gv = val
    torch.manual_seed(seed)
    net = build(kind, x.shape[1], n_classes, x.shape[-1], pretrained=pretrained, vit=vit).to(device)
    opt = adamw(net.parameters(), lr, weight_decay=0.05 if kind == "vit" else 1e-4, fused=kind == "vit")
    gen = torch.Generator().manual_seed(seed)
    weights, best, best_acc = np.ones(len(y)), None, -1.0
    # batch norm cannot train on one image: a last batch of one is skipped in a network that has it
    batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    for epoch in range(epochs):
        net.train()
        order = torch.multinomial(torch.as_tensor(weights, dtype=torch.float), len(y), True, generator=gen) \
            if reweight else torch.randperm(len(y), generator=gen)
        for idx in order.split(batch_size):
            if batch_norm and len(idx) == 1 < len(y):
                continue
            xb = x[idx].to(device)
            if kind != "resnet50":  # light augmentation: random 2-px shifts
                dy, dx = torch.randint(-2, 3, (2,), generator=gen).tolist()
                xb = torch.roll(xb, (dy, dx), (2, 3))
            loss = F.cross_entropy(net(xb), torch.as_tensor(y[idx.numpy()], device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        pv = predict_net(net, xv, device).argmax(1)
        acc = float(np.mean(pv == yv))
        if acc > best_acc:
            best, best_acc = copy.deepcopy(net.state_dict()), acc
        if reweight:  # FairGen's adaptive inverse-performance weights for the next epoch
            w_s = inverse_performance_weights(_group_acc(yv, pv, gv))
            weights = np.array([w_s.get(s, 1.0 / len(w_s)) for s in g])
    net.load_state_dict(best)
    return net


@torch.no_grad()
def predict_net(net, x, device, batch_size=512):
    net.eval()
    return torch.cat([torch.softmax(net(x[i:i + batch_size].to(device)), 1).cpu()
                      for i in range(0, len(x), batch_size)]).numpy()


def _pca(x_tr, dims=50, seed=0):
    from sklearn.decomposition import PCA
    p = PCA(min(dims, len(x_tr) - 1, x_tr.shape[1]), random_state=seed)
    p.fit(x_tr)
    return p


def fit_predict(kind, tr, val, te_x, n_classes, reweight=False, seed=0, device="cpu", epochs=15, pretrained=False,
                vit=None):
    """Train one downstream classifier; return class probabilities on te_x.
    tr / val: (x (N, C, S, S) in [-1, 1] tensor, y (N,) int array, groups (N,) array); vit: the ViT's size
    (see classify.nets.build)."""
    if kind in ("vit", "resnet50"):
        net = _fit_net(kind, tr, val, n_classes, epochs, reweight, seed, device, pretrained, vit)
        return predict_net(net, te_x, device)
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.neighbors import KNeighborsClassifier
    x, y, g = tr[0].flatten(1).numpy(), tr[1], tr[2]
    pca = _pca(x, seed=seed)
    f_tr, f_val, f_te = pca.transform(x), pca.transform(val[0].flatten(1).numpy()), pca.transform(te_x.flatten(1).numpy())

    def full(model, f):  # probabilities for every class, also those absent from training
        p = np.zeros((len(f), n_classes))
        p[:, model.classes_] = model.predict_proba(f)
        return p
    if kind == "knn":
        m = KNeighborsClassifier(n_neighbors=min(15, len(y)), weights="distance").fit(f_tr, y)
        return full(m, f_te)
    m = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.1, random_state=seed).fit(f_tr, y)
    if reweight:
        w_s = inverse_performance_weights(_group_acc(val[1], full(m, f_val).argmax(1), val[2]))
        sw = np.array([w_s.get(s, 1.0 / len(w_s)) for s in g]) * len(w_s)
        m = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.1, random_state=seed).fit(f_tr, y,
                                                                                                sample_weight=sw)
    return full(m, f_te)
