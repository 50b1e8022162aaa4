//! How the HTTP threads reach a receiver: directly, or through the proxy
//! that the server's environment names, read as curl reads it
//! (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`, upper or lower
//! case). HTTPS goes through a `CONNECT` tunnel, so TLS is still end to end;
//! plain HTTP is sent to the proxy in absolute form, as proxies expect (many
//! refuse `CONNECT` to port 80). Network I/O only, like the rest of the thread.

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connection, however it was made: TLS or plain TCP to the receiver,
/// directly or through a tunnel, or plain TCP to a proxy that forwards each
/// request (`forwarded`).
pub struct Conn {
    stream: MaybeHttpsStream<TokioIo<TcpStream>>,
    forwarded: bool,
}

#[derive(Clone)]
pub struct Connector {
    tcp: HttpConnector,
    tls: Arc<rustls::ClientConfig>,
    direct: HttpsConnector<HttpConnector>,
    proxies: Arc<Matcher>,
}

impl Connector {
    pub fn new(tcp: HttpConnector, tls: rustls::ClientConfig, proxies: Arc<Matcher>) -> Connector {
        let tls = Arc::new(tls);
        let direct = https(tcp.clone(), &tls);
        Connector { tcp, tls, direct, proxies }
    }
}

fn https<C>(inner: C, tls: &Arc<rustls::ClientConfig>) -> HttpsConnector<C> {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((**tls).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(inner)
}

/// The `Proxy-Authorization` a plain-HTTP request to `uri` must carry: the
/// proxy's credentials, when it has some and forwards the request. (A tunnel
/// sends them once, in its `CONNECT`.)
pub fn forward_auth(proxies: &Matcher, uri: &Uri) -> Option<hyper::header::HeaderValue> {
    if uri.scheme() == Some(&hyper::http::uri::Scheme::HTTPS) {
        return None;
    }
    proxies.intercept(uri)?.basic_auth().cloned()
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // HttpConnector, Tunnel and HttpsConnector are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let Some(proxy) = this.proxies.intercept(&dst) else {
                return Ok(Conn { stream: this.direct.clone().call(dst).await?, forwarded: false });
            };
            if dst.scheme() == Some(&hyper::http::uri::Scheme::HTTPS) {
                let mut tunnel = Tunnel::new(proxy.uri().clone(), this.tcp.clone());
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                let stream = https(tunnel, &this.tls).call(dst).await.map_err(|e| format!("through proxy {}: {e}", shown(proxy.uri())))?;
                return Ok(Conn { stream, forwarded: false });
            }
            let stream = this.tcp.clone().call(proxy.uri().clone()).await.map_err(|e| format!("proxy {}: {e}", shown(proxy.uri())))?;
            Ok(Conn { stream: MaybeHttpsStream::Http(stream), forwarded: true })
        })
    }
}

/// A proxy's address for an error text, without credentials.
fn shown(uri: &Uri) -> String {
    let host = uri.host().unwrap_or("?");
    match uri.port_u16() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        let connected = self.stream.connected();
        // A forwarding proxy makes hyper write requests in absolute form.
        if self.forwarded { connected.proxy(true) } else { connected }
    }
}

impl Read for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl Write for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_forwarded_plain_http_carries_the_proxy_credentials() {
        let proxies = Matcher::builder()
            .http("http://outbox:s3cret@proxy.example:3128")
            .https("http://outbox:s3cret@proxy.example:3128")
            .no("internal.example")
            .build();
        let auth = |url: &str| forward_auth(&proxies, &url.parse().unwrap()).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(auth("http://hooks.example/users/1").as_deref(), Some("Basic b3V0Ym94OnMzY3JldA=="));
        // In a tunnel's CONNECT instead, never inside TLS.
        assert_eq!(auth("https://hooks.example/users/1"), None);
        assert_eq!(auth("http://api.internal.example/users/1"), None);
        let none = Matcher::builder().build();
        assert_eq!(forward_auth(&none, &"http://hooks.example/".parse().unwrap()), None);
        assert_eq!(shown(&"http://outbox:s3cret@proxy.example:3128".parse().unwrap()), "proxy.example:3128");
    }
}
