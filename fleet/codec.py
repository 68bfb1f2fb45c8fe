"""numpy arrays <-> protocol Tensors, camera images <-> JPEG/PNG Images.

Decoding is where untrusted bytes from the network become arrays, so it checks everything and raises
ValueError with a message naming the problem: object/string dtypes (never decoded), a shape whose size
does not match the bytes, and absurd sizes (over `max_bytes`), before allocating anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from fleet.proto import flotilla_pb2 as pb
from fleet.text import clip

# Numeric kinds only: bool, signed/unsigned int, float. No objects, strings, void or complex.
ALLOWED_KINDS = "biuf"
DEFAULT_MAX_TENSOR_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_ENCODINGS = {"jpeg": ".jpg", "png": ".png"}


def parse_dtype(name: str) -> np.dtype:
    """A numeric numpy dtype from its name ("float32", "uint8", "<f4", ...)."""
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise ValueError(f"unknown dtype {clip(name)!r}") from None
    if dtype.kind not in ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(
            f"dtype {clip(name)!r} is not allowed: only bool, integer and float arrays travel as Tensors"
        )
    return dtype


def parse_shape(shape: Sequence[int], what: str = "tensor") -> tuple[int, ...]:
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"{what}: negative dimension in shape {dims}")
    if len(dims) > 8:
        raise ValueError(f"{what}: {len(dims)} dimensions is more than the 8 allowed")
    return dims


def to_tensor(array) -> pb.Tensor:
    """Encode an array (anything np.asarray accepts) as a Tensor, row-major, native byte order."""
    array = np.asarray(array)
    # Rejects object/string arrays early, on the sender's side; the wire always carries native order.
    dtype = parse_dtype(array.dtype.str).newbyteorder("=")
    array = np.ascontiguousarray(array, dtype=dtype)
    return pb.Tensor(shape=array.shape, dtype=dtype.name, data=array.tobytes())


def from_tensor(
    tensor: pb.Tensor, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES, what: str = "tensor"
) -> np.ndarray:
    """Decode a Tensor to a read-only array; ValueError names what is wrong with a bad one."""
    dtype = parse_dtype(tensor.dtype) if tensor.dtype else None
    if dtype is None:
        raise ValueError(f"{what}: dtype is empty")
    shape = parse_shape(tensor.shape, what)
    expected = math.prod(shape) * dtype.itemsize
    if expected > max_bytes:
        raise ValueError(
            f"{what}: shape {shape} of {dtype.name} is {expected} bytes, over the limit of {max_bytes}"
        )
    if len(tensor.data) != expected:
        raise ValueError(
            f"{what}: shape {shape} of {dtype.name} needs {expected} bytes, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def tensors_to_arrays(
    tensors: Mapping[str, pb.Tensor], max_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> dict[str, np.ndarray]:
    return {key: from_tensor(value, max_bytes, what=key) for key, value in tensors.items()}


def encode_image(image: np.ndarray, encoding: str = "jpeg", quality: int = 85) -> pb.Image:
    """An H x W (gray) or H x W x 3 (RGB) uint8 image as a compressed Image."""
    image = np.asarray(image)
    if (
        image.dtype != np.uint8
        or image.ndim not in (2, 3)
        or (image.ndim == 3 and image.shape[2] not in (1, 3))
    ):
        raise ValueError(f"an image must be uint8 H x W or H x W x 3, got {image.dtype} {image.shape}")
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"unknown image encoding {clip(encoding)!r}; use one of {sorted(IMAGE_ENCODINGS)}")
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 and image.shape[2] == 3 else image
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if encoding == "jpeg" else []
    ok, buffer = cv2.imencode(IMAGE_ENCODINGS[encoding], bgr, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} image as {encoding}")
    return pb.Image(encoding=encoding, data=buffer.tobytes(), width=image.shape[1], height=image.shape[0])


def decode_image(message: pb.Image, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """An Image back to uint8 RGB (H x W x 3) or gray (H x W)."""
    if message.encoding not in IMAGE_ENCODINGS:
        raise ValueError(
            f"unknown image encoding {clip(message.encoding)!r}; expected one of {sorted(IMAGE_ENCODINGS)}"
        )
    if message.width * message.height > max_pixels:
        raise ValueError(
            f"image of {message.width} x {message.height} is over the limit of {max_pixels} pixels"
        )
    image = cv2.imdecode(np.frombuffer(message.data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"image data ({len(message.data)} bytes) is not a valid {message.encoding}")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ValueError(
            f"decoded image of {image.shape[1]} x {image.shape[0]} is over the limit of {max_pixels} pixels"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else image
