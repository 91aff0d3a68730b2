"""minikd: knowledge distillation and uncertainty distillation for segmentation and depth.

One file per concern, each read alongside the notebook that teaches it:

    data       ToyCity (the embedded street scenes), Cityscapes/NYUv2/GTA5 loaders, joint transforms,
               the U-Net KD paper's six classes (unet_kd_sets)
    models     smp segmenters, the U-Net family (M128 ... M1024, shrunk as M128/4), merged classes, the DUDES student, SegFormer/DepthFormer/SegDepthFormer
    losses     pixel-wise KD and its reduction conventions, CWD, SKD (incl. holistic), IFVD, RMSLE, EMUFormer
    metrics    mIoU, ECE, PAvPU, AUROC/AP/FPR95, removal curves, depth metrics, FLOPs, timing
    ensembles  deep ensembles (looped or vmapped), MC dropout, sub-ensembles, the teacher cache
    fusion     pseudo-label fusion for domain adaptation (Chao et al.: unify, channel-wise fusion)
    adaptation UDA methods that train notebook 05's teachers (AdaBN, MinEnt, CBST, DACS ClassMix)
    training   fit (resumable, DDP), evaluate, train_ensemble, grid search, results files
    protocol   Niemann et al.'s fair-comparison protocol for KD (notebook 06) on grid search
"""

__version__ = "0.1.0"

__all__ = ["__version__"]  # import the submodules you need: `from minikd import data, models`
