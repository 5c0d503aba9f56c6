"""Float64 numpy transcriptions of the reference algorithms (IST-DASLab/gptq `GPTQ.fasterquant`
with its `Quantizer(sym=False, perchannel=True)`, IST-DASLab/sparsegpt `SparseGPT.fasterprune`
with or without its quantizer), written loop for loop as the papers' code walks the columns, so that
tests/test_compress.py can compare opt_jax.compress against them."""

import numpy as np


def find_params(x, bits):
    maxq = 2**bits - 1
    xmin = np.minimum(x.min(1), 0)
    xmax = np.maximum(x.max(1), 0)
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1, 1
    scale = (xmax - xmin) / maxq
    zero = np.round(-xmin / scale)
    return scale, zero


def quantize(x, scale, zero, bits):
    q = np.clip(np.round(x / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


def inverse_cholesky(H, percdamp):
    H = H.copy()
    H[np.diag_indices_from(H)] += percdamp * np.mean(np.diag(H))
    inverse = np.linalg.inv(H)  # cholesky_inverse(cholesky(H)) = H^-1
    return np.linalg.cholesky(inverse).T  # cholesky(., upper=True)


def dead_columns(W, H):
    W, H = W.copy(), H.copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def fasterquant(W, H, bits, groupsize=-1, actorder=False, static_groups=False, blocksize=128,
                percdamp=0.01):  # fmt: skip
    W = np.array(W, np.float64)
    H = np.array(H, np.float64)
    columns = W.shape[1]
    scale, zero = find_params(W, bits)
    W, H = dead_columns(W, H)
    if static_groups:
        groups = [find_params(W[:, i : i + groupsize], bits) for i in range(0, columns, groupsize)]
    if actorder:
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[:, perm], H[perm][:, perm]
    Q = np.zeros_like(W)
    Hinv = inverse_cholesky(H, percdamp)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        scale, zero = find_params(W[:, i1 + i : i1 + i + groupsize], bits)
                else:
                    idx = perm[i1 + i] if actorder else i1 + i
                    scale, zero = groups[idx // groupsize]
            q = quantize(w, scale, zero, bits)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if actorder:
        Q = Q[:, np.argsort(perm)]
    return Q


def fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01, wbits=None):
    W = np.array(W, np.float64)
    H = np.array(H, np.float64)
    columns = W.shape[1]
    if wbits is not None:  # the reference's quantizer, fitted per row before dead columns
        scale, zero = find_params(W, wbits)
    W, H = dead_columns(W, H)
    Hinv = inverse_cholesky(H, percdamp)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / np.diag(Hinv1)[None, :] ** 2
            thresh = np.sort(tmp.ravel())[int(tmp.size * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = np.zeros(W1.shape, bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : i + prunem] ** 2 / np.diag(Hinv1)[i : i + prunem][None, :] ** 2
                smallest = np.argsort(tmp, axis=1, kind="stable")[:, :prunen]
                np.put_along_axis(mask1, i + smallest, True, axis=1)
            q = w.copy()
            q[mask1[:, i]] = 0
            if wbits is not None:
                q = quantize(q, scale, zero, wbits)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


def add_batch(H, nsamples, inp):
    """The reference's running Hessian, one batch [batch, tokens, in] at a time (nsamples
    counts rows of the batch: the reference's `tmp = inp.shape[0]` after unsqueeze(0) for a
    [tokens, in] input, so it averages over batches of equal size)."""
    tmp = inp.shape[0]
    inp = inp.reshape(-1, inp.shape[-1]).T
    H = H * nsamples / (nsamples + tmp)
    nsamples += tmp
    inp = np.sqrt(2 / nsamples) * inp
    return H + inp @ inp.T, nsamples
