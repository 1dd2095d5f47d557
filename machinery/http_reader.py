"""Machinery a learner may skip: reading a shard over HTTP as if it were a local file, reconnecting
where a long download drops, and never splicing two versions of a file."""

import http.client
import itertools
import time
import urllib.error
import urllib.request

from machinery.cli import DataError

HTTP_RETRIES = 5  # failed attempts in a row before an HTTP shard gives up
HTTP_BACKOFF = 1.0  # seconds before the second retry; doubles with each further one
HTTP_TIMEOUT = 60  # seconds of silence before a connection counts as dropped


class HTTPReader:
    """The bytes of a URL, front to back. A dropped connection is reopened with a Range request at
    the byte where it stopped; If-Range carries the first response's ETag (or Last-Modified), so a
    file that changed on the server comes back whole (status 200) and is refused, never spliced."""

    def __init__(self, url):
        self.url, self.pos, self.size, self.validator, self.response = url, 0, None, None, None

    def read(self, n):
        for failures in itertools.count(1):
            try:
                if self.response is None:
                    self.response = self._request()
                data = self.response.read(n)
                if not data and self.size is not None and self.pos < self.size:
                    raise ConnectionError("the server closed the connection early")
                self.pos += len(data)
                return data
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code not in (408, 429):  # 404 and the like: retrying will not help
                    raise DataError(f"shard {self.url} answered HTTP {e.code} {e.reason}; "
                                    "check the URL") from None
                error = f"HTTP {e.code} {e.reason}"
            except (OSError, http.client.HTTPException) as e:
                error = getattr(e, "reason", None) or e
            self.close()
            if failures > HTTP_RETRIES:
                raise DataError(f"shard {self.url} could not be read after {HTTP_RETRIES} retries ({error}); "
                                "check the network or pass local shards with --data and --val-data")
            time.sleep(HTTP_BACKOFF * 2 ** (failures - 2) if failures > 1 else 0)

    def _request(self):
        headers = {"User-Agent": "leviathan-train"}
        if self.pos:
            if not self.validator:
                raise DataError(f"shard {self.url} dropped the connection and its server sends no ETag to "
                                "resume it safely; download the shard and pass the file with --data")
            headers.update({"Range": f"bytes={self.pos}-", "If-Range": self.validator})
        request = urllib.request.Request(self.url, headers=headers)
        response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)
        if not self.pos:
            self.validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
            length = response.headers.get("Content-Length")
            self.size = int(length) if length else None
        elif response.status != 206 or not response.headers.get("Content-Range", "").startswith(
                f"bytes {self.pos}-"):
            response.close()
            raise DataError(f"shard {self.url} changed on the server (or cannot resume) while it was read, "
                            "so it was not spliced; rerun with --resume to read it again")
        return response

    def close(self):
        if self.response is not None:
            self.response.close()
            self.response = None
