"""FileCipher / AsyncFileCipher: encrypt and decrypt files or streams of any size, with bounded memory.

See crypto_client/_async/files.py (the one declaration; the blocking FileCipher is generated from it).
"""

from crypto_client._async.files import AsyncFileCipher
from crypto_client._atomic import atomic_file, write_atomically
from crypto_client._sync.files import FileCipher
from crypto_client.models import Progress

__all__ = ["AsyncFileCipher", "FileCipher", "Progress", "atomic_file", "write_atomically"]
