"""microfossil: find, extract and measure microfossils in micro-CT scans of rock cores.

The notebooks reach this package through `utils.py` (the names they use); each module
holds one concern, and imports run one way, from top to bottom of this list:

- `params`: the notebooks' parameters, each checked where it enters (`check_params`), quick mode's schedule (`use_schedule`)
- `io`: atomic writes (every file is renamed into place only when complete), JSON, label TIFFs
- `runtime`: Colab or not: Drive and the runtime's local disk, in-place copies, the GPU check, progress bars
- `readers`: a scan's slices one at a time, whatever format a scanner wrote (TIFF, BMP, MetaImage, NRRD, NIfTI, HDF5, DICOM)
- `scans`: which files make up a scan and its labels (`scan_parts`), and the voxel size its metadata records
- `sparse`: sparse labels: the slices and pixels a person left unlabelled (`UNLABELLED`), which no loss or score counts
- `volume`: reading and validating a scan into one uint8 volume (`load_volume`, `Volume`, `read_voxel_size`, the cache)
- `specimens`: 3D components, measurements and descriptors of each specimen
- `split`: the validation, training and test blocks, which share no specimen (`split_volume`, `scoring_split`)
- `sample`: the embedded synthetic micro-CT sample
- `paths`: the dataset and run folders, and the run's settings typed once (`use_run`, `run.json`; `fetch_dataset`)
- `bundle`: the model bundle, a trained model (and its classifier's examples) that travels to the next core
- `metrics`: confusion matrix, per-class IoU and Dice, the published metric
- `augment`: training augmentation batch-wise on the device: flips, rotation, zoom, lighting, infills, another scanner [torch]
- `loaders`: fastai DataLoaders straight from the volume, batch transforms on the device   [torch]
- `learner`: the U-Net learner, its per-epoch metrics, and what it holds checked (`check_held`) [torch]
- `training`: `PhaseCheckpoint`, the callback that checkpoints, resumes and retrains a phase [torch]
- `prediction`: every slice at full resolution, with context slices, TTA, tri-planar        [torch]
- `decisions`: the review's decisions in `exports/review.csv`, read however a spreadsheet saved it
- `exports`: meshes, TIFF crops, previews, the gallery
- `extraction`: `extract_fossils`, from predicted labels to the catalogue and the exports
- `classifier`: the specimen classifier
- `assemblage`: counts and volumes of each class per depth interval along the core (`write_assemblage`)
- `evaluation`: the scores of a run on its test block, from test data only, voxels and specimens, with provenance
- `review`: the review session and panel
- `viewers`: the slice browser and the 3D views of the specimens (ipywidgets, plotly)
- `plots`: figures and the attempts table (beside the chain: any module may use it; it uses only `io`)

Only the modules marked [torch] import torch or fastai.
"""
import warnings

__version__ = "0.4.0"

# fastai's imports call torch.jit.script, which recent torch flags as deprecated: not ours to act on.
warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated")
