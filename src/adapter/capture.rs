//! Taking reparameterizations off a model, which Burn's traversal does not allow directly.
//!
//! A `ModuleMapper` sees a weight with its reparameterization detached, and `materialize` folds
//! every reparameterization into its weight. So, to take the states off without changing any
//! weight, `materialize` runs with a thread-local capture switched on: each state's `apply`
//! records the state and returns the base unchanged. `materialize` runs on the calling thread,
//! which makes the thread-local sound.
//!
//! A drop guard ends the capture, so a panic inside it cannot leave later forwards on the
//! thread capturing (and so silently adapter-free).

use core::any::Any;
use core::cell::RefCell;

thread_local! {
    static CAPTURED: RefCell<Option<Vec<Box<dyn Any>>>> = const { RefCell::new(None) };
}

/// Record a copy of `value` if a capture is running on this thread; true when it did, and the
/// caller should then act as if it were absent.
pub(crate) fn record<T: Clone + 'static>(value: &T) -> bool {
    CAPTURED.with(|captured| match captured.borrow_mut().as_mut() {
        Some(values) => {
            values.push(Box::new(value.clone()));
            true
        }
        None => false,
    })
}

/// Run `work` with the capture on: `work`'s result, and the values of type `T` recorded while
/// it ran, in order. Captures nest: an outer capture resumes afterwards, even if `work`
/// panics.
pub(crate) fn capturing<T: 'static, R>(work: impl FnOnce() -> R) -> (R, Vec<T>) {
    let guard = Guard {
        previous: Some(CAPTURED.with(|captured| captured.borrow_mut().replace(Vec::new()))),
    };
    let result = work();
    let values = guard.finish();
    let values = values
        .into_iter()
        .filter_map(|value| value.downcast::<T>().ok().map(|value| *value))
        .collect();
    (result, values)
}

/// Restores the capture that was running before, on drop.
struct Guard {
    previous: Option<Option<Vec<Box<dyn Any>>>>,
}

impl Guard {
    /// End this capture normally: what it recorded.
    fn finish(mut self) -> Vec<Box<dyn Any>> {
        self.restore()
    }

    fn restore(&mut self) -> Vec<Box<dyn Any>> {
        let Some(previous) = self.previous.take() else {
            return Vec::new();
        };
        CAPTURED.with(|captured| {
            let mut captured = captured.borrow_mut();
            let values = captured.take().unwrap_or_default();
            *captured = previous;
            values
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.restore();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_inside_a_capture_and_nests() {
        assert!(!record(&1_u32));
        let (inner, outer) = capturing::<u32, _>(|| {
            assert!(record(&1_u32));
            let ((), inner) = capturing::<u32, _>(|| {
                assert!(record(&2_u32));
            });
            assert!(record(&3_u32));
            inner
        });
        assert_eq!(inner, vec![2]);
        assert_eq!(outer, vec![1, 3]);
        assert!(!record(&4_u32));
    }

    #[test]
    fn a_panic_inside_a_capture_ends_it() {
        let result = std::panic::catch_unwind(|| {
            capturing::<u32, _>(|| {
                record(&1_u32);
                panic!("inside the capture");
            })
        });
        assert!(result.is_err());
        assert!(!record(&2_u32), "the capture outlived the panic");
    }
}
