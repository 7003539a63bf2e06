"""A factory of bad input files: each builder writes one small broken or misleading input.

Every builder has the signature ``builder(folder: Path) -> Path`` and writes only inside
``folder`` (created if needed); the returned path is what a user would pass to a command.
`BAD_VOLUMES` maps a case name to ``(builder, what a reader must say)`` for volumes that every
CT-reading command must refuse in one line; `LABEL_MAP_CASES` lists files given where a label
map is expected; `BAD_OPTIONS` (with `bad_option_case`) lists option values refused while parsing;
`BAD_UNET_CONFIGS` lists model configs for `unet_config_folder`; the remaining builders (BERT
folders, label/name mismatches, MR folders) are named by what they make. Import as ``import bad_files`` (``Testing/conftest.py`` puts this folder on
``sys.path``); everything is deterministic and a few KB in size.

    import bad_files
    for name, (build, expected) in bad_files.BAD_VOLUMES.items():
        path = build(tmp_path / name)
        ...  # run a command on path, expect exit 2 and `expected` in its one stderr line
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np

import data_factory
from lctfound.io.volume import CTVolume, write_volume


def _ct(shape=(6, 16, 20)) -> CTVolume:
    return data_factory.synthetic_ct(shape=shape)


def _folder(folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


# ------------------------------------------------------------------ headers that lie about the data

def nifti_header_claiming_huge_volume(folder) -> Path:
    """A .nii whose header claims 512×512×10000 int16 voxels on a 2 KB file."""
    path = write_volume(_ct((4, 8, 8)), _folder(folder) / "huge_claim.nii")
    data = bytearray(path.read_bytes())
    data[40:56] = struct.pack("<8h", 3, 512, 512, 10000, 1, 1, 1, 1)
    path.write_bytes(bytes(data))
    return path


def nifti_header_claiming_more_slices(folder) -> Path:
    """A .nii whose header claims twice the slices the file holds (fits in memory; data short)."""
    volume = _ct((4, 8, 8))
    path = write_volume(volume, _folder(folder) / "more_slices.nii")
    data = bytearray(path.read_bytes())
    data[46:48] = struct.pack("<h", 8)
    path.write_bytes(bytes(data))
    return path


def truncated_nifti(folder) -> Path:
    return _truncate(write_volume(_ct(), _folder(folder) / "truncated.nii"), 0.6)


def truncated_nifti_gz(folder) -> Path:
    """A CT .nii.gz cut in half: ITK would read the missing voxels as zeros."""
    return _truncate(write_volume(_ct(), _folder(folder) / "truncated.nii.gz"), 0.5)


def nifti_gz_with_short_data(folder) -> Path:
    """A complete, valid gzip stream whose NIfTI data is shorter than the header declares."""
    path = write_volume(_ct(), _folder(folder) / "short_data.nii.gz")
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 700]))
    return path


def truncated_nrrd(folder) -> Path:
    return _truncate(write_volume(_ct(), _folder(folder) / "truncated.nrrd", compress=False), 0.6)


def truncated_nrrd_gz(folder) -> Path:
    return _truncate(write_volume(_ct(), _folder(folder) / "truncated_gz.nrrd", compress=True), 0.6)


def nrrd_header_claiming_huge_volume(folder) -> Path:
    path = write_volume(_ct((4, 8, 8)), _folder(folder) / "huge_claim.nrrd", compress=False)
    text = path.read_bytes().replace(b"sizes: 8 8 4", b"sizes: 512 512 10000")
    path.write_bytes(text)
    return path


def detached_nrrd_with_short_data(folder) -> Path:
    """A .nhdr + .raw pair whose raw file lacks its last slices."""
    folder = _folder(folder)
    volume = _ct((4, 8, 8))
    raw = folder / "short.raw"
    raw.write_bytes(np.ascontiguousarray(volume.array.astype("<i2"))[:3].tobytes())
    header = folder / "short.nhdr"
    header.write_text("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 8 8 4\n"
                      "space directions: (0.75,0,0) (0,0.75,0) (0,0,2.5)\nendian: little\nencoding: raw\n"
                      "space origin: (0,0,0)\ndata file: short.raw\n")
    return header


def detached_nrrd_missing_data(folder) -> Path:
    folder = _folder(folder)
    header = folder / "missing.nhdr"
    header.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 4\n"
                      "space directions: (1,0,0) (0,1,0) (0,0,1)\nendian: little\nencoding: raw\n"
                      "data file: missing.raw\n")
    return header


def truncated_mha(folder) -> Path:
    return _truncate(write_volume(_ct(), _folder(folder) / "truncated.mha", compress=False), 0.6)


def truncated_mha_compressed(folder) -> Path:
    return _truncate(write_volume(_ct(), _folder(folder) / "truncated_z.mha", compress=True), 0.6)


def mha_header_claiming_huge_volume(folder) -> Path:
    path = write_volume(_ct((4, 8, 8)), _folder(folder) / "huge_claim.mha", compress=False)
    path.write_bytes(path.read_bytes().replace(b"DimSize = 8 8 4", b"DimSize = 512 512 10000"))
    return path


def detached_mhd_with_short_data(folder) -> Path:
    folder = _folder(folder)
    volume = _ct((4, 8, 8))
    (folder / "short.raw").write_bytes(np.ascontiguousarray(volume.array.astype("<i2"))[:2].tobytes())
    header = folder / "short.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
                      "CompressedData = False\nElementSpacing = 0.75 0.75 2.5\nDimSize = 8 8 4\n"
                      "ElementType = MET_SHORT\nElementDataFile = short.raw\n")
    return header


# ------------------------------------------------------------------ non-finite and unit-less data

def _nan_ct() -> CTVolume:
    volume = _ct()
    array = volume.array.astype(np.float32)
    array[2, 3, 4] = np.nan
    array[3, 5, 6] = np.inf
    return volume.with_array(array)


def nan_nifti(folder) -> Path:
    """NaN and +inf voxels in a float NIfTI (ITK's NIfTI reader would turn them into 0 HU)."""
    import SimpleITK as sitk

    from lctfound.io.volume import volume_to_sitk

    # Written by SimpleITK itself: `write_volume` verifies by reading back, and ITK's NIfTI reader
    # turns NaN into 0, so a NaN NIfTI never verifies (which is right for outputs).
    path = _folder(folder) / "nan.nii.gz"
    sitk.WriteImage(volume_to_sitk(_nan_ct()), str(path))
    return path


def nan_nrrd(folder) -> Path:
    return write_volume(_nan_ct(), _folder(folder) / "nan.nrrd")


def nan_mha(folder) -> Path:
    return write_volume(_nan_ct(), _folder(folder) / "nan.mha")


def nifti_pixdim_zero(folder) -> Path:
    """A NIfTI with pixdim 0 and neither qform nor sform (ITK reads it as 1 mm without a word)."""
    import nibabel

    array = np.transpose(_ct().array, (2, 1, 0))  # nibabel stores (i, j, k)
    image = nibabel.Nifti1Image(array, None)
    header = image.header
    header.set_qform(None, code=0)
    header.set_sform(None, code=0)
    path = _folder(folder) / "pixdim0.nii"
    nibabel.save(image, str(path))
    data = bytearray(path.read_bytes())  # nibabel "repairs" pixdim 0 on save: write it as found in the wild
    data[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)
    path.write_bytes(bytes(data))
    return path


def nrrd_without_spacing(folder) -> Path:
    path = write_volume(_ct(), _folder(folder) / "no_spacing.nrrd", compress=False)
    data = path.read_bytes()
    start = data.index(b"space directions:")
    end = data.index(b"\n", start) + 1
    path.write_bytes(data[:start] + data[end:])
    return path


def mha_without_spacing(folder) -> Path:
    path = write_volume(_ct(), _folder(folder) / "no_spacing.mha", compress=False)
    data = path.read_bytes()
    start = data.index(b"ElementSpacing")
    end = data.index(b"\n", start) + 1
    path.write_bytes(data[:start] + data[end:])
    return path


# ------------------------------------------------------------------ DICOM folders

def dicom_two_series_same_size(folder) -> Path:
    """Two CT series of the same size in one folder: which one is meant cannot be guessed."""
    folder = _folder(folder) / "two_series"
    volume = _ct()
    data_factory.write_dicom_series(volume, folder, series_uid="1.2.826.0.1.3680043.8.498.1", prefix="A",
                                    series_number=1, description="Lung kernel")
    data_factory.write_dicom_series(volume, folder, series_uid="1.2.826.0.1.3680043.8.498.2", prefix="B",
                                    series_number=2, description="Soft tissue kernel")
    return folder


def dicom_mixed_slice_sizes(folder) -> Path:
    """One series whose slices do not all have the same number of rows and columns."""
    folder = _folder(folder) / "mixed_sizes"
    uid = "1.2.826.0.1.3680043.8.498.3"
    study = "1.2.826.0.1.3680043.8.498.4"
    big = _ct((6, 16, 20))
    data_factory.write_dicom_series(big, folder, series_uid=uid, study_uid=study, prefix="A", shuffle=False)
    small = data_factory.synthetic_ct(shape=(6, 12, 12))
    files = data_factory.write_dicom_series(small, folder / "tmp", series_uid=uid, study_uid=study, prefix="B",
                                            shuffle=False)
    # Replace the last slice of the series by a smaller one at the same position.
    import pydicom

    target = sorted(folder.glob("A*.dcm"))[-1]
    reference = pydicom.dcmread(target)
    odd = pydicom.dcmread(files[-1])
    odd.ImagePositionPatient = reference.ImagePositionPatient
    odd.FrameOfReferenceUID = reference.FrameOfReferenceUID
    odd.SOPInstanceUID = reference.SOPInstanceUID
    odd.file_meta.MediaStorageSOPInstanceUID = reference.SOPInstanceUID
    odd.save_as(target, enforce_file_format=True)
    for path in files:
        path.unlink()
    (folder / "tmp").rmdir()
    return folder


# ------------------------------------------------------------------ the wrong kind of image

def mr_volume(folder) -> Path:
    """An MR-like volume (0..4000, no air at -1000 HU) in a NIfTI file."""
    return write_volume(data_factory.synthetic_mr((6, 16, 20)), _folder(folder) / "mr.nii.gz")


def mr_folder(folder) -> Path:
    """A folder of two MR-like volumes (e.g. for `train pretrain`)."""
    folder = _folder(folder) / "mr_volumes"
    folder.mkdir(exist_ok=True)
    for seed in (1, 2):
        write_volume(data_factory.synthetic_mr((6, 16, 20), seed=seed), folder / f"mr{seed}.nii.gz")
    return folder


def ct_volume(folder) -> Path:
    """A good CT (int16 HU): given where a label map is expected it must be refused as a CT."""
    return write_volume(_ct(), _folder(folder) / "ct.nii.gz")


def float_ct_volume(folder) -> Path:
    """A CT stored as float32 with fractional HU (a CT given as a label map, non-integer values)."""
    volume = _ct()
    return write_volume(volume.with_array(volume.array.astype(np.float32) + 0.25), _folder(folder) / "ct_float.nrrd")


def negative_label_map(folder) -> Path:
    volume = _ct()
    label = np.zeros(volume.shape, np.int16)
    label[2:4, 5:9, 5:9] = -1
    return write_volume(volume.with_array(label), _folder(folder) / "negative_labels.nrrd")


def label_map_with_values(folder, values=(1, 7), name: str = "labels.nrrd") -> Path:
    """A label map on `_ct()`'s grid holding the given values (at most 12) on separate blobs of slices 1–4."""
    volume = _ct()
    label = np.zeros(volume.shape, np.uint8 if max(values) < 256 else np.uint16)
    for index, value in enumerate(values):
        row, column = 1 + 5 * (index % 3), 1 + 5 * (index // 3)
        label[1:5, row:row + 4, column:column + 4] = value
    return write_volume(volume.with_array(label), _folder(folder) / name)


def good_ct(folder) -> Path:
    """The CT `label_map_with_values` lies on."""
    return write_volume(_ct(), _folder(folder) / "good_ct.nii.gz")


# ------------------------------------------------------------------ models and weights

def bert_folder_with_pickle_only(folder) -> Path:
    """A BERT folder whose weights are only a pickled ``pytorch_model.bin`` (never to be loaded)."""
    folder = _folder(folder) / "bert_pickle"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768,
                                                    "num_hidden_layers": 1, "num_attention_heads": 12,
                                                    "intermediate_size": 64, "vocab_size": 30}))
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "window"]) + "\n")
    # Bytes of a pickle that would run code if it were ever unpickled.
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94"
                                               b"\x8c\x06system\x94\x93\x94\x8c\x04true\x94\x85\x94R\x94.")
    return folder


def unet_config_folder(folder, **changes) -> Path:
    """A model folder (config only, no weights) holding the cpu-tiny U-Net config with ``changes``."""
    from lctfound.models.presets import get_preset

    folder = _folder(folder) / "bad_model"
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    config = dict(get_preset("cpu-tiny").unet_config)
    config.update(changes)
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    return folder


#: name -> (builder, a phrase the one-line error must contain) for volumes every reader refuses.
BAD_VOLUMES = {
    "nifti_header_claiming_huge_volume": (nifti_header_claiming_huge_volume, "header declares"),
    "nifti_header_claiming_more_slices": (nifti_header_claiming_more_slices, "header declares"),
    "truncated_nifti": (truncated_nifti, "header declares"),
    "truncated_nifti_gz": (truncated_nifti_gz, "truncated"),
    "nifti_gz_with_short_data": (nifti_gz_with_short_data, "header declares"),
    "truncated_nrrd": (truncated_nrrd, "header declares"),
    "truncated_nrrd_gz": (truncated_nrrd_gz, "truncated"),
    "nrrd_header_claiming_huge_volume": (nrrd_header_claiming_huge_volume, "header declares"),
    "detached_nrrd_with_short_data": (detached_nrrd_with_short_data, "header declares"),
    "detached_nrrd_missing_data": (detached_nrrd_missing_data, "does not exist"),
    "truncated_mha": (truncated_mha, "header declares"),
    "truncated_mha_compressed": (truncated_mha_compressed, "truncated"),
    "mha_header_claiming_huge_volume": (mha_header_claiming_huge_volume, "header declares"),
    "detached_mhd_with_short_data": (detached_mhd_with_short_data, "header declares"),
    "nan_nifti": (nan_nifti, "NaN or infinite"),
    "nan_nrrd": (nan_nrrd, "NaN or infinite"),
    "nan_mha": (nan_mha, "NaN or infinite"),
    "nifti_pixdim_zero": (nifti_pixdim_zero, "no voxel size"),
    "nrrd_without_spacing": (nrrd_without_spacing, "no voxel size"),
    "mha_without_spacing": (mha_without_spacing, "no voxel size"),
    "dicom_two_series_same_size": (dicom_two_series_same_size, "1.2.826.0.1.3680043.8.498.2"),
    "dicom_mixed_slice_sizes": (dicom_mixed_slice_sizes, "rows and columns"),
}

#: name -> (builder, phrase) for files given where a label map is expected.
LABEL_MAP_CASES = {
    "ct_as_label_map": (ct_volume, "looks like a CT image, not a label map"),
    "float_ct_as_label_map": (float_ct_volume, "looks like a CT image, not a label map"),
    "negative_labels": (negative_label_map, "negative"),
}

#: name -> (argv with {ct}, {labels}, {data} placeholders, phrase of the error) for option values every
#: command must refuse while parsing, before reading anything; add ``-o OUT`` (see `bad_option_case`).
BAD_OPTIONS = {
    "segment train --epochs 0": (["segment", "train", "{ct}", "--labels", "{labels}", "--epochs", "0"], "--epochs"),
    "segment train --epochs -5": (["segment", "train", "{ct}", "--labels", "{labels}", "--epochs", "-5"], "--epochs"),
    "segment train --slices 5-2": (["segment", "train", "{ct}", "--labels", "{labels}", "--slices", "5-2"],
                                   "runs backwards"),
    "train pretrain --epochs 0": (["train", "pretrain", "{data}", "--epochs", "0"], "--epochs"),
    "train pretrain --epochs -1": (["train", "pretrain", "{data}", "--epochs", "-1"], "--epochs"),
    "train pretrain --lr -1": (["train", "pretrain", "{data}", "--lr", "-1"], "--lr"),
    "train pretrain --lr nan": (["train", "pretrain", "{data}", "--lr", "nan"], "--lr"),
    "train pretrain --num-workers -1": (["train", "pretrain", "{data}", "--num-workers", "-1"], "--num-workers"),
    "train pretrain --resolution 100000": (["train", "pretrain", "{data}", "--resolution", "100000"], "--resolution"),
    "train pretrain --batch-size 0": (["train", "pretrain", "{data}", "--batch-size", "0"], "--batch-size"),
    "train finetune --timestep 5000": (["train", "finetune", "--task", "segmentation", "--image", "{ct}",
                                        "--labels", "{labels}", "--timestep", "5000"], "--timestep"),
    "generate --guidance-scale nan": (["generate", "--guidance-scale", "nan"], "--guidance-scale"),
    "generate --guidance-scale inf": (["generate", "--guidance-scale", "inf"], "--guidance-scale"),
    "generate --size 100000": (["generate", "--size", "100000"], "--size"),
    "generate --steps 100000": (["generate", "--steps", "100000"], "--steps"),
    "generate --num-images 0": (["generate", "--num-images", "0"], "--num-images"),
    "features --slices 5-2": (["features", "{ct}", "--slices", "5-2"], "runs backwards"),
    "features --batch-size -1": (["features", "{ct}", "--batch-size", "-1"], "--batch-size"),
    "enhance simulate-low-dose --dose 0": (["enhance", "simulate-low-dose", "{ct}", "--dose", "0"], "--dose"),
    "enhance simulate-low-dose --dose nan": (["enhance", "simulate-low-dose", "{ct}", "--dose", "nan"], "--dose"),
    "evaluate segmentation --slices 3-1": (["evaluate", "segmentation", "-p", "{labels}", "-r", "{labels}",
                                           "--slices", "3-1"], "runs backwards"),
    "evaluate --bootstrap -1": (["evaluate", "segmentation", "-p", "{labels}", "-r", "{labels}",
                                 "--bootstrap", "-1"], "--bootstrap"),
}


def bad_option_case(name: str, folder) -> tuple[list, str]:
    """The argv (good CT, label map and data folder written into ``folder``) and phrase of `BAD_OPTIONS`[name]."""
    folder = _folder(folder)
    values = {"ct": good_ct(folder), "labels": label_map_with_values(folder, (1,)), "data": folder}
    argv, phrase = BAD_OPTIONS[name]
    return [part.format(**values) for part in argv], phrase


#: name -> (changes to the cpu-tiny U-Net config for `unet_config_folder`, phrase of the error).
BAD_UNET_CONFIGS = {
    "5M channels": ({"block_out_channels": [5_000_000] * 5}, "block_out_channels"),
    "widths not divisible by the groups": ({"block_out_channels": [16, 32, 64, 96, 130]}, "norm_num_groups"),
    "unknown block type": ({"down_block_types": ["NoSuchBlock2D"] * 5}, "NoSuchBlock2D"),
    "block lists of the wrong length": ({"up_block_types": ["UpBlock2D"]}, "up_block_types"),
    "absurd sample size": ({"sample_size": 100_000}, "sample_size"),
    "absurd network": ({"block_out_channels": [4096] * 8, "down_block_types": ["DownBlock2D"] * 8,
                        "up_block_types": ["UpBlock2D"] * 8, "layers_per_block": 16}, "parameters"),
}
