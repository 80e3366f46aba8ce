"""Test kit for TLS: a throwaway CA, a server certificate for 127.0.0.1 and localhost, and a
TLS front that terminates TLS with it and pipes the bytes to a plain upstream (the simulator).

`TestCA` is made with the `openssl` CLI into a temporary directory removed by `cleanup()`.
`TlsFront` is a threaded TCP server: one thread per connection does the handshake and then
relays both ways with select() (an SSL object is never read and written from two threads);
`stop()` closes every connection and joins every thread.
"""

import os
import select
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading

SERVER_EXTENSIONS = """\
subjectAltName = IP:127.0.0.1, DNS:localhost
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


class TestCA:
    """A CA (`ca_file`) and a server certificate it signed (`cert_file`, `key_file`)."""

    __test__ = False        # not a pytest test class

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="dario-tls-")
        self.ca_file = self._path("ca.pem")
        self.cert_file = self._path("server.pem")
        self.key_file = self._path("server.key")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        try:
            self._openssl("req", "-x509", *ec, "-keyout", self._path("ca.key"), "-out", self.ca_file,
                          "-days", "2", "-subj", "/CN=dario test CA",
                          "-addext", "basicConstraints=critical,CA:TRUE",
                          "-addext", "keyUsage=critical,keyCertSign,cRLSign")
            self._openssl("req", *ec, "-keyout", self.key_file, "-out", self._path("server.csr"),
                          "-subj", "/CN=localhost")
            with open(self._path("server.ext"), "w", encoding="ascii") as fh:
                fh.write(SERVER_EXTENSIONS)
            self._openssl("x509", "-req", "-in", self._path("server.csr"), "-CA", self.ca_file,
                          "-CAkey", self._path("ca.key"), "-CAcreateserial", "-days", "2",
                          "-extfile", self._path("server.ext"), "-out", self.cert_file)
        except BaseException:
            self.cleanup()
            raise

    def _path(self, name):
        return os.path.join(self.dir, name)

    @staticmethod
    def _openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    def server_context(self):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self):
        return ssl.create_default_context(cafile=self.ca_file)

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def openssl_missing():
    return shutil.which("openssl") is None


def close_listener(listener):
    """Close a listening socket and wake a thread blocked in its accept() (close alone
    does not, on Linux)."""
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    listener.close()


class TlsFront:
    """TLS on 127.0.0.1:`port` in front of a plain `backend` (host, port)."""

    def __init__(self, ca, backend):
        self.context = ca.server_context()
        self.backend = backend
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.connections = 0            # TCP connections accepted
        self.handshakes = 0             # TLS handshakes completed
        self._lock = threading.Lock()
        self._open = set()
        self._threads = []
        self._stopping = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name=f"tls-front-{self.port}", daemon=True)
        self._acceptor.start()

    def _accept(self):
        while not self._stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return                  # the listener was closed by stop()
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                self.connections += 1
                self._open.add(sock)
                thread = threading.Thread(target=self._serve, args=(sock,),
                                          name=f"tls-front-{self.port}-{self.connections}", daemon=True)
                self._threads.append(thread)
            thread.start()

    def _serve(self, raw):
        tls = backend = None
        try:
            raw.settimeout(10)
            tls = self.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            with self._lock:
                self._open.add(tls)     # raw is detached now: stop() shuts down tls instead
            tls.do_handshake()
            with self._lock:
                self.handshakes += 1
            backend = socket.create_connection(self.backend, timeout=10)
            with self._lock:
                self._open.add(backend)
            self._pipe(tls, backend)
        except (OSError, ValueError):   # handshake refused, peer gone, or stop() closed us
            pass
        finally:
            for sock in (tls, backend, raw):
                if sock is not None:
                    with self._lock:
                        self._open.discard(sock)
                    sock.close()

    def _pipe(self, tls, backend):
        tls.settimeout(None)
        backend.settimeout(None)
        while not self._stopping.is_set():
            ready = [tls] if tls.pending() else select.select([tls, backend], [], [], 0.5)[0]
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                (backend if sock is tls else tls).sendall(data)

    def stop(self):
        self._stopping.set()
        close_listener(self.listener)
        self._acceptor.join(5)
        with self._lock:
            socks, threads = list(self._open), list(self._threads)
        for sock in socks:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(5)
