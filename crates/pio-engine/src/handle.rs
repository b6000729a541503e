//! The engine on its own thread, shared by many callers.
//!
//! [`EngineHandle::spawn`] starts a thread that owns an [`Engine`] and loops: take new commands,
//! run a step, send each request's output down its stream. [`EngineHandle::submit`] returns a
//! [`RequestStream`] to read them from (`recv().await` in async code, `blocking_recv()`
//! elsewhere). Dropping the stream cancels the request: the engine removes it and frees its
//! blocks before the next step, whether it was waiting, prefilling or decoding.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use pio_model::tokenizer::Tokenizer;
use pio_model::CausalLm;
use tokio::sync::mpsc as async_mpsc;

use crate::engine::{validate_request, Engine, EngineConfig, RequestLimits, RequestOutput, RequestParams};
use crate::kv_cache::SeqId;
use crate::metrics::Metrics;
use crate::{EngineError, Result};

/// What a request's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Output(RequestOutput),
    /// The request failed (the engine's error, as text); nothing follows.
    Error(String),
}

enum Command {
    Add { id: SeqId, prompt: Vec<u32>, params: Box<RequestParams>, tx: async_mpsc::UnboundedSender<Event> },
    Abort(SeqId),
    Shutdown,
}

/// A running engine thread.
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
    limits: RequestLimits,
    max_queued: usize,
    next_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// For reports that read the model's own counters (the expert cache).
    model: Arc<dyn CausalLm>,
    tokenizer: Option<Arc<Tokenizer>>,
    /// Checks guided requests' grammars before they are queued (shared with the engine).
    guides: crate::guided::Guides,
}

impl EngineHandle {
    /// Starts the engine thread, whose kernels run on the thread pool current here
    /// ([`pio_kernels::parallel::ThreadPool::current`]: install one around this call to choose
    /// the engine's threads). `max_queued` caps the requests waiting for admission
    /// ([`EngineError::QueueFull`] beyond it).
    pub fn spawn(
        model: Arc<dyn CausalLm>,
        tokenizer: Option<Arc<Tokenizer>>,
        cfg: EngineConfig,
        max_queued: usize,
    ) -> Result<EngineHandle> {
        Self::spawn_with_draft(model, tokenizer, cfg, max_queued, None)
    }

    /// As [`spawn`](Self::spawn), with a draft model for speculative decoding
    /// ([`Engine::with_draft`]).
    pub fn spawn_with_draft(
        model: Arc<dyn CausalLm>,
        tokenizer: Option<Arc<Tokenizer>>,
        cfg: EngineConfig,
        max_queued: usize,
        draft: Option<Arc<dyn CausalLm>>,
    ) -> Result<EngineHandle> {
        let limits = RequestLimits::new(cfg, model.as_ref(), tokenizer.is_some());
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let m = metrics.clone();
        let model_ref = model.clone();
        let tokenizer_ref = tokenizer.clone();
        let guides = crate::guided::Guides::default();
        let engine_guides = guides.clone();
        let pool = pio_kernels::parallel::ThreadPool::current();
        let thread = std::thread::Builder::new()
            .name("pio-engine".into())
            .spawn(move || {
                pool.install(|| engine_thread(model, draft, tokenizer, cfg, (m, engine_guides), rx, ready_tx))
            })
            .map_err(|e| EngineError::Invalid(format!("starting the engine thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(EngineError::Stopped),
        }
        Ok(EngineHandle {
            tx,
            metrics,
            limits,
            max_queued,
            next_id: AtomicU64::new(0),
            thread: Mutex::new(Some(thread)),
            model: model_ref,
            tokenizer: tokenizer_ref,
            guides,
        })
    }

    pub fn config(&self) -> EngineConfig {
        self.limits.cfg
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The engine's metrics and, where experts stream from disk, the expert cache's, in
    /// Prometheus text format.
    pub fn render_prometheus(&self) -> String {
        let mut s = self.metrics.render_prometheus();
        if let Some(c) = self.model.expert_cache_stats() {
            s.push_str(&crate::metrics::render_expert_cache(&c));
        }
        s
    }

    /// Whether the engine thread is still running.
    pub fn is_alive(&self) -> bool {
        self.thread.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Checks and queues a request. Errors: the request is invalid (bad sampling values, prompt
    /// too long...), too many are queued, or the engine has stopped.
    pub fn submit(&self, prompt: Vec<u32>, params: RequestParams) -> Result<RequestStream> {
        validate_request(&self.limits, &prompt, &params)?;
        if let Some(g) = &params.guide {
            // A grammar that does not compile is the caller's error, before anything is queued.
            self.guides.matcher(self.tokenizer.as_deref(), self.model.shape().vocab_size, g)?;
        }
        let in_flight = &self.metrics.requests_in_flight;
        let waiting = self.metrics.requests_waiting.load(Ordering::Acquire);
        let reserved = in_flight.fetch_add(1, Ordering::AcqRel);
        if waiting + reserved >= self.max_queued {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::QueueFull(waiting + reserved));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = async_mpsc::unbounded_channel();
        if self.tx.send(Command::Add { id, prompt, params: Box::new(params), tx }).is_err() {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Stopped);
        }
        Ok(RequestStream { id, rx, cmd: self.tx.clone(), done: false })
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// The outputs of one request. Dropping it before the request finished cancels the request.
pub struct RequestStream {
    id: SeqId,
    rx: async_mpsc::UnboundedReceiver<Event>,
    cmd: mpsc::Sender<Command>,
    done: bool,
}

impl RequestStream {
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// The next event; `None` after the last one (or if the engine stopped).
    pub async fn recv(&mut self) -> Option<Event> {
        let e = self.rx.recv().await;
        self.note(&e);
        e
    }

    /// [`recv`](Self::recv) for code outside an async runtime.
    pub fn blocking_recv(&mut self) -> Option<Event> {
        let e = self.rx.blocking_recv();
        self.note(&e);
        e
    }

    fn note(&mut self, e: &Option<Event>) {
        match e {
            Some(Event::Output(o)) if o.finish_reason.is_none() => {}
            _ => self.done = true,
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.cmd.send(Command::Abort(self.id));
        }
    }
}

fn engine_thread(
    model: Arc<dyn CausalLm>,
    draft: Option<Arc<dyn CausalLm>>,
    tokenizer: Option<Arc<Tokenizer>>,
    cfg: EngineConfig,
    // What the handle shares with the engine: its metrics and its grammar compiler.
    (metrics, guides): (Arc<Metrics>, crate::guided::Guides),
    rx: mpsc::Receiver<Command>,
    ready: mpsc::Sender<Result<()>>,
) {
    let mut engine = match Engine::with_draft(model.as_ref(), tokenizer.as_deref(), cfg, draft.as_deref()) {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    engine.set_metrics(metrics.clone());
    engine.set_guides(guides);
    // A server's memory is fixed at start: the cache is its budget, resident before requests.
    engine.prefault_cache();
    let _ = ready.send(Ok(()));
    let mut streams: HashMap<SeqId, async_mpsc::UnboundedSender<Event>> = HashMap::new();
    loop {
        // Block for a command when idle; otherwise take whatever has arrived.
        let first = if engine.has_work() {
            None
        } else {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        };
        for cmd in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match cmd {
                Command::Add { id, prompt, params, tx } => {
                    // Counted as waiting by the engine before it leaves the in-flight count, so
                    // the waiting gauge never dips in between.
                    let added = engine.add_request_with_id(id, prompt, *params);
                    metrics.requests_in_flight.fetch_sub(1, Ordering::AcqRel);
                    match added {
                        Ok(()) => {
                            streams.insert(id, tx);
                        }
                        Err(e) => {
                            let _ = tx.send(Event::Error(e.to_string()));
                        }
                    }
                }
                Command::Abort(id) => {
                    engine.abort(id);
                    streams.remove(&id);
                }
                Command::Shutdown => return,
            }
        }
        // Requests whose caller went away (a dropped stream also sends Abort; this catches a
        // receiver closed without dropping).
        let gone: Vec<SeqId> = streams.iter().filter(|(_, tx)| tx.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            engine.abort(id);
            streams.remove(&id);
        }
        if !engine.has_work() {
            continue;
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| engine.step())) {
            Ok(Ok(outputs)) => {
                for o in outputs {
                    let (id, finished) = (o.id, o.finish_reason.is_some());
                    let delivered = streams.get(&id).is_some_and(|tx| tx.send(Event::Output(o)).is_ok());
                    if finished || !delivered {
                        if !delivered && !finished {
                            engine.abort(id);
                        }
                        streams.remove(&id);
                    }
                }
            }
            Ok(Err(e)) => fail_all(&mut engine, &mut streams, &e.to_string()),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                fail_all(&mut engine, &mut streams, &format!("internal error in the engine: {msg}"));
                // The engine's state may be inconsistent after a panic: stop serving.
                return;
            }
        }
    }
}

/// Ends every request with `msg`.
fn fail_all(engine: &mut Engine<'_>, streams: &mut HashMap<SeqId, async_mpsc::UnboundedSender<Event>>, msg: &str) {
    for (id, tx) in streams.drain() {
        let _ = tx.send(Event::Error(msg.to_string()));
        engine.abort(id);
    }
}
