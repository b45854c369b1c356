//! A TCP load balancer for fleet tests: it hands each new connection to the next backend in
//! turn (no stickiness, like a balancer in front of a fleet), copies bytes both ways, and can
//! cut every connection it carries at once, as a network blip or a dying node would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::TestResult;

/// Round-robin TCP balancer on a loopback port.
pub struct Balancer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    backends: Mutex<Vec<SocketAddr>>,
    next: AtomicUsize,
    /// One task per proxied connection; aborting it closes both sockets.
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl Balancer {
    /// Starts balancing over `backends`, in turn.
    pub async fn start(backends: &[SocketAddr]) -> TestResult<Balancer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            backends: Mutex::new(backends.to_vec()),
            next: AtomicUsize::new(0),
            connections: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Balancer {
            addr,
            shared,
            accept,
        })
    }

    /// Closes every connection carried so far; new ones are still accepted.
    pub fn cut_all(&self) {
        for connection in self.shared.connections.lock().drain(..) {
            connection.abort();
        }
    }

    /// Stops sending new connections to `backend` (a node taken out of rotation).
    pub fn remove(&self, backend: SocketAddr) {
        self.shared.backends.lock().retain(|b| *b != backend);
    }

    /// Which backend the next connection goes to.
    pub fn next_backend(&self) -> Option<SocketAddr> {
        let backends = self.shared.backends.lock();
        (!backends.is_empty())
            .then(|| backends[self.shared.next.load(Ordering::Relaxed) % backends.len()])
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((client, _)) = listener.accept().await {
        let backend = {
            let backends = shared.backends.lock();
            if backends.is_empty() {
                continue;
            }
            backends[shared.next.fetch_add(1, Ordering::Relaxed) % backends.len()]
        };
        let task = tokio::spawn(proxy(client, backend));
        let mut connections = shared.connections.lock();
        connections.retain(|c| !c.is_finished());
        connections.push(task);
    }
}

/// Copies bytes both ways until either side closes; a refused backend closes the client.
async fn proxy(mut client: TcpStream, backend: SocketAddr) {
    if let Ok(mut server) = TcpStream::connect(backend).await {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    }
}
