"""A local GCS API for the tests: gcp-storage-emulator (PyPI) on 127.0.0.1, with the object
generation semantics that tensorstore's OCDBT driver (orbax's checkpoint format) relies on and the
emulator lacks: the `x-goog-generation` header on downloads and the ifGenerationMatch /
ifGenerationNotMatch preconditions (OCDBT commits its manifest with a conditional write).

    python tests/gcs_emulator.py PORT BUCKET [BUCKET ...]

serves until its stdin closes and prints `ready` once the buckets exist. Clients find it through
STORAGE_EMULATOR_HOST (google-cloud-storage, gcsfs) and TENSORSTORE_GCS_HTTP_URL (tensorstore).
"""
import http.server
import sys
import threading
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import buckets, objects


def _generation(storage, bucket, name):
    try:
        return str(storage.get_file_obj(bucket, name).get("generation") or "")
    except NotFound:
        return None


def _precondition_failed(request, storage, name):
    """True when an ifGenerationMatch / ifGenerationNotMatch query does not hold ("0": absent)."""
    q = request.query
    gen = _generation(storage, request.params["bucket_name"], name)
    current = gen if gen is not None else "0"
    if "ifGenerationMatch" in q and q["ifGenerationMatch"][0] != current:
        return HTTPStatus.PRECONDITION_FAILED
    if "ifGenerationNotMatch" in q and q["ifGenerationNotMatch"][0] == current:
        return HTTPStatus.NOT_MODIFIED
    return None


def _wrap_download(real):
    def download(request, response, storage, *args, **kwargs):
        name = request.params["object_id"]
        fail = _precondition_failed(request, storage, name)
        gen = _generation(storage, request.params["bucket_name"], name)
        if gen is not None:
            response["x-goog-generation"] = gen
        if fail is not None and gen is not None:
            response.status = fail
            return
        return real(request, response, storage, *args, **kwargs)
    return download


def _wrap_insert(real):
    def insert(request, response, storage, *args, **kwargs):
        name = request.query.get("name", [None])[0]
        if name is not None:
            fail = _precondition_failed(request, storage, name)
            if fail is not None:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return
        return real(request, response, storage, *args, **kwargs)
    return insert


def patch():
    wrapped = {objects.download: _wrap_download(objects.download), objects.insert: _wrap_insert(objects.insert)}
    # objects.get serves ?alt=media through the module's `download`, the router uses `insert` by name.
    objects.download, objects.insert = wrapped[objects.download], wrapped[objects.insert]
    server.HANDLERS = tuple((regex, {m: wrapped.get(h, h) for m, h in handlers.items()})
                            for regex, handlers in server.HANDLERS)


def main(argv):
    port, names = int(argv[0]), argv[1:]
    patch()
    # The emulator's server is single-threaded, so one kept-alive connection blocks every other
    # (tensorstore opens many and times out): one thread per connection, one request at a time.
    http.server.HTTPServer = http.server.ThreadingHTTPServer
    lock = threading.Lock()
    handle = server.Router.handle

    def locked(self, method):
        with lock:
            return handle(self, method)

    server.Router.handle = locked
    srv = server.create_server("127.0.0.1", port, in_memory=True)
    for name in names:
        buckets.create_bucket(name, srv._storage)
    srv.start()
    print("ready", flush=True)
    try:
        # Serves until stdin closes (the parent exited): its last gs:// uploads (tensorboardX's
        # writers flush again when collected at interpreter exit) still find the server.
        sys.stdin.read()
    finally:
        srv.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
