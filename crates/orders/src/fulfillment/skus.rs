//! The SKUs step: stock per SKU, partitioned by SKU.
//!
//! Its input, `<out>.sku-requests`, is keyed by SKU, so every request for
//! one SKU reaches the one instance that holds that SKU's stock, in the
//! order they were made: reservations of a SKU never race.

use chrono::Utc;
use herald::HandlerError;
use herald_kafka::processor::{ChangelogRecord, ChangelogTable, Input, Transform};
use herald_kafka::OutgoingRecord;
use uuid::Uuid;

use super::{SkuAnswer, SkuChange, SkuRequest, SkuReserved, SkuShort, Stock, Topics};

/// The SKUs step's transform and its state.
#[derive(Debug)]
pub struct SkuStep {
    answers: String,
    settings: Stock,
    /// Units left per SKU; a SKU never changed has its initial stock.
    stock: ChangelogTable<i64>,
}

impl SkuStep {
    /// The step of the topology with `topics`.
    pub fn new(topics: &Topics, settings: Stock) -> Self {
        Self {
            answers: topics.sku_answers.clone(),
            settings,
            stock: ChangelogTable::new(&topics.sku_stock),
        }
    }

    fn available(&self, sku: &str) -> i64 {
        if self.settings.out_of_stock.contains(sku) {
            return 0;
        }
        self.stock
            .get(sku)
            .copied()
            .unwrap_or(self.settings.initial)
    }

    fn reserve(
        &mut self,
        request: &SkuChange,
        input: &Input,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        let available = self.available(&request.sku);
        let now = Utc::now();
        if available < request.quantity {
            let answer = SkuAnswer::SkuShort(SkuShort {
                event_id: Uuid::new_v4(),
                order_id: request.order_id,
                sku: request.sku.clone(),
                wanted: request.quantity,
                available,
                caused_by: request.event_id,
                timestamp: now,
            });
            return Ok(vec![input.output(&self.answers, &answer)?]);
        }
        let change = self.stock.put_in(
            input.partition,
            request.sku.clone(),
            available - request.quantity,
        )?;
        let answer = SkuAnswer::SkuReserved(SkuReserved {
            event_id: Uuid::new_v4(),
            order_id: request.order_id,
            sku: request.sku.clone(),
            quantity: request.quantity,
            caused_by: request.event_id,
            timestamp: now,
        });
        Ok(vec![change, input.output(&self.answers, &answer)?])
    }

    fn release(
        &mut self,
        request: &SkuChange,
        input: &Input,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        let back = self.available(&request.sku) + request.quantity;
        Ok(vec![self.stock.put_in(
            input.partition,
            request.sku.clone(),
            back,
        )?])
    }
}

impl Transform<SkuRequest> for SkuStep {
    async fn process(
        &mut self,
        request: SkuRequest,
        input: Input,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        match &request {
            SkuRequest::ReserveSku(change) => self.reserve(change, &input),
            SkuRequest::ReleaseSku(change) => self.release(change, &input),
        }
    }

    fn restore(&mut self, record: &ChangelogRecord) -> Result<(), HandlerError> {
        self.stock.restore(record)
    }

    fn commit(&mut self) {
        self.stock.commit();
    }

    fn rollback(&mut self) {
        self.stock.rollback();
    }

    fn revoked(&mut self, partitions: &[i32]) {
        self.stock.drop_partitions(partitions);
    }
}
