"""The image files of a dataset checked before training: present, decodable, complete, and of
the size their records state (DATASETS.CHECK_IMAGE_FILES).

Fast without decoding every image: PIL's ``Image.open`` reads only the header (format, size,
EXIF orientation), and a file's last bytes tell whether it is complete (a JPEG ends with its
EOI marker, a PNG with its IEND chunk). Only a file whose end is missing, or of another format,
is decoded, so a truncated file is named and an intact one with trailing bytes still passes.
The files are read in chunks on threads (a network filesystem answers several reads at once).
Corruption inside an intact-looking JPEG is not found here; the data loader names that file
when it fails to decode it.
"""
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError

THREADS = 16  # concurrent reads: on a network filesystem a read waits for a round trip
CHUNK = 200  # files per thread task
EXIF_ORIENTATION = 274  # the EXIF tag that detectron2's read_image applies
TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
# format -> the bytes a complete file ends with
ENDINGS = {"JPEG": b"\xff\xd9", "PNG": b"\x00\x00\x00\x00IEND\xaeB`\x82"}

MISSING, NOT_DECODABLE, WRONG_SIZE = "missing", "not decodable", "wrong size"


def oriented_size(image):
    """(width, height) of an opened PIL image as detectron2's read_image returns it (EXIF
    orientation applied); the EXIF block is read only when the header holds it (a PNG would be
    decoded for it)."""
    width, height = image.size
    if "exif" in image.info and image.getexif().get(EXIF_ORIENTATION) in TRANSPOSED:
        return height, width
    return width, height


def _complete(f, image_format):
    ending = ENDINGS.get(image_format)
    if ending is None:
        return False
    f.seek(0, 2)
    if f.tell() < len(ending):
        return False
    f.seek(-len(ending), 2)
    return f.read() == ending


def check_image(path, width, height):
    """None if the file at `path` is a complete image of `width` x `height` (after its EXIF
    orientation; width None: any size), else (kind, detail): kind MISSING (no readable file),
    NOT_DECODABLE (not an image, truncated or corrupt) or WRONG_SIZE (detail: the file's
    "WxH")."""
    try:
        f = open(path, "rb")
    except OSError as e:  # not found, a folder, no permission
        return MISSING, f"{type(e).__name__}: {e.strerror}"
    with f:
        try:
            image = Image.open(f)
            size = oriented_size(image)
            if not _complete(f, image.format):
                f.seek(0)
                Image.open(f).load()  # decode: raises for a truncated or corrupt file
        except UnidentifiedImageError:
            return NOT_DECODABLE, "UnidentifiedImageError: no image format PIL reads"
        except (OSError, SyntaxError, ValueError) as e:
            return NOT_DECODABLE, f"{type(e).__name__}: {e}"
    if width is not None and size != (width, height):
        return WRONG_SIZE, f"{size[0]}x{size[1]}"
    return None


def _check_chunk(records):
    return [(r, check_image(r["file_name"], r.get("width"), r.get("height"))) for r in records]


def image_file_problems(records, chunk=CHUNK):
    """[(record, (kind, detail))] of the detectron2 records whose image file is not a complete
    image of the record's width x height, in record order."""
    chunks = [records[i:i + chunk] for i in range(0, len(records), chunk)]
    with ThreadPoolExecutor(THREADS) as pool:
        return [(r, problem) for checked in pool.map(_check_chunk, chunks)
                for r, problem in checked if problem]
