//! A TCP proxy on loopback whose open connections can be made to go silent — bytes stop flowing
//! both ways and nothing is closed, as when a peer vanishes off the network — while new
//! connections pass.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub(crate) struct SilentProxy {
    pub port: u16,
    /// Connections numbered below this forward nothing.
    cutoff: Arc<AtomicU64>,
    /// How many connections were opened.
    opened: Arc<AtomicU64>,
}

impl SilentProxy {
    /// A proxy to `127.0.0.1:upstream`.
    pub(crate) async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cutoff = Arc::new(AtomicU64::new(0));
        let opened = Arc::new(AtomicU64::new(0));
        let (cut, gen) = (cutoff.clone(), opened.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { continue };
                let mine = gen.fetch_add(1, Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, mine, cut.clone()));
                tokio::spawn(pump(sr, cw, mine, cut.clone()));
            }
        });
        Self { port, cutoff, opened }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Every connection open now goes silent, for good; later ones pass.
    pub(crate) fn silence_open_connections(&self) {
        self.cutoff.store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// How many connections have been opened through the proxy.
    pub(crate) fn opened(&self) -> u64 {
        self.opened.load(Ordering::SeqCst)
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mine: u64,
    cutoff: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if mine < cutoff.load(Ordering::SeqCst) {
            // Hold both sockets open and forward nothing, ever.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
