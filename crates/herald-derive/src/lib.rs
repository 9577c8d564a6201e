//! `#[derive(EventPayload)]` and `#[derive(Event)]` for herald's typed
//! events; use them through `herald` (`#[derive(herald::Event)]`), which
//! re-exports both and documents them with examples.
//!
//! The generated code names `::herald` (and its re-exported `uuid` and
//! `chrono`), so a user crate needs no other dependency.
//!
//! # Layout
//! - [`derive_event_payload`]: a struct's `#[event(id)]`, `#[event(key)]`
//!   and `#[event(time)]` fields become its `EventPayload`.
//! - [`derive_event`]: an enum of one-field variants becomes an `Event`
//!   family: types, delegation to the variant, the fast decode path; the
//!   serde tag the wire format needs is checked at compile time.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::quote;
use syn::spanned::Spanned;
use syn::{parse_macro_input, Data, DeriveInput, Fields, LitStr};

/// Implements `herald::EventPayload` for a struct from three marked
/// fields: `#[event(id)]` (a `Uuid`), `#[event(key)]` (anything
/// `ToString`: the aggregate id, the Kafka key) and `#[event(time)]`
/// (a `DateTime<Utc>`).
#[proc_macro_derive(EventPayload, attributes(event))]
pub fn derive_event_payload(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    payload(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Implements `herald::Event` for an enum whose variants each wrap one
/// `EventPayload` struct; the variant's name is its `event_type`. The
/// enum needs `#[event(aggregate = "…")]` and serde's
/// `#[serde(tag = "event_type")]` (checked here: the wire format and the
/// fast decode path depend on it).
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    family(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

fn payload(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new(
            input.span(),
            "#[derive(EventPayload)] is for a struct (an enum family derives Event)",
        ));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new(
            input.span(),
            "#[derive(EventPayload)] needs named fields",
        ));
    };
    let (mut id, mut key, mut time) = (None, None, None);
    for field in &fields.named {
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("event")) {
            attr.parse_nested_meta(|meta| {
                let slot = if meta.path.is_ident("id") {
                    &mut id
                } else if meta.path.is_ident("key") {
                    &mut key
                } else if meta.path.is_ident("time") {
                    &mut time
                } else {
                    return Err(meta.error("expected `id`, `key` or `time`"));
                };
                if slot.is_some() {
                    return Err(meta.error("marked on two fields"));
                }
                *slot = field.ident.clone();
                Ok(())
            })?;
        }
    }
    let missing = |what: &str| {
        syn::Error::new(
            input.ident.span(),
            format!("#[derive(EventPayload)] needs one field marked #[event({what})]"),
        )
    };
    let id = id.ok_or_else(|| missing("id"))?;
    let key = key.ok_or_else(|| missing("key"))?;
    let time = time.ok_or_else(|| missing("time"))?;
    let name = &input.ident;
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics ::herald::EventPayload for #name #type_generics #where_clause {
            fn event_id(&self) -> ::herald::__private::uuid::Uuid {
                self.#id
            }
            fn aggregate_id(&self) -> ::std::string::String {
                ::std::string::ToString::to_string(&self.#key)
            }
            fn occurred_at(
                &self,
            ) -> ::herald::__private::chrono::DateTime<::herald::__private::chrono::Utc> {
                self.#time
            }
        }
    })
}

/// The `aggregate = "…"` of the enum's `#[event(…)]`.
fn aggregate(input: &DeriveInput) -> syn::Result<LitStr> {
    let mut aggregate = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("event")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("aggregate") {
                aggregate = Some(meta.value()?.parse::<LitStr>()?);
                Ok(())
            } else {
                Err(meta.error("expected `aggregate = \"…\"`"))
            }
        })?;
    }
    aggregate.ok_or_else(|| {
        syn::Error::new(
            input.ident.span(),
            "#[derive(Event)] needs #[event(aggregate = \"…\")], e.g. \"order\"",
        )
    })
}

/// Whether `attrs` hold serde's `tag = "event_type"`, and no renaming
/// (the variant's name is its `event_type`).
fn check_serde(input: &DeriveInput) -> syn::Result<()> {
    let mut tagged = false;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("tag") {
                tagged = meta.value()?.parse::<LitStr>()?.value() == "event_type";
            } else if meta.path.is_ident("rename_all") {
                return Err(meta
                    .error("an Event family's variant names are its event types: no rename_all"));
            } else if meta.input.peek(syn::Token![=]) {
                // Other settings (e.g. `deny_unknown_fields`, `bound = …`).
                let _: syn::Expr = meta.value()?.parse()?;
            } else if meta.input.peek(syn::token::Paren) {
                meta.parse_nested_meta(|inner| {
                    if inner.input.peek(syn::Token![=]) {
                        let _: syn::Expr = inner.value()?.parse()?;
                    }
                    Ok(())
                })?;
            }
            Ok(())
        })?;
    }
    if tagged {
        Ok(())
    } else {
        Err(syn::Error::new(
            input.ident.span(),
            "an Event family must be tagged #[serde(tag = \"event_type\")]: the wire format carries the type in that field",
        ))
    }
}

fn family(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let Data::Enum(data) = &input.data else {
        return Err(syn::Error::new(
            input.span(),
            "#[derive(Event)] is for an enum of event structs (a struct derives EventPayload)",
        ));
    };
    let aggregate = aggregate(input)?;
    check_serde(input)?;
    let mut variants = Vec::new();
    for variant in &data.variants {
        let one_field = matches!(&variant.fields, Fields::Unnamed(f) if f.unnamed.len() == 1);
        if !one_field {
            return Err(syn::Error::new(
                variant.span(),
                "each variant of an Event family wraps one event struct: `Name(Name)`",
            ));
        }
        if variant
            .attrs
            .iter()
            .any(|a| a.path().is_ident("serde") && quote!(#a).to_string().contains("rename"))
        {
            return Err(syn::Error::new(
                variant.span(),
                "a variant's name is its event type: no #[serde(rename)]",
            ));
        }
        variants.push(&variant.ident);
    }
    if variants.is_empty() {
        return Err(syn::Error::new(
            Span::call_site(),
            "an Event family needs at least one variant",
        ));
    }
    let names: Vec<String> = variants.iter().map(|v| v.to_string()).collect();
    let name = &input.ident;
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics ::herald::Event for #name #type_generics #where_clause {
            const AGGREGATE_TYPE: &'static str = #aggregate;
            const EVENT_TYPES: &'static [&'static str] = &[#(#names),*];

            fn event_type(&self) -> &'static str {
                match self {
                    #(Self::#variants(_) => #names,)*
                }
            }
            fn event_id(&self) -> ::herald::__private::uuid::Uuid {
                match self {
                    #(Self::#variants(e) => ::herald::EventPayload::event_id(e),)*
                }
            }
            fn aggregate_id(&self) -> ::std::string::String {
                match self {
                    #(Self::#variants(e) => ::herald::EventPayload::aggregate_id(e),)*
                }
            }
            fn occurred_at(
                &self,
            ) -> ::herald::__private::chrono::DateTime<::herald::__private::chrono::Utc> {
                match self {
                    #(Self::#variants(e) => ::herald::EventPayload::occurred_at(e),)*
                }
            }
            fn decode_variant(
                event_type: &str,
                payload: &[u8],
            ) -> ::std::option::Option<Self> {
                match event_type {
                    #(#names => ::herald::event::decode_variant(payload, event_type, Self::#variants),)*
                    _ => ::std::option::Option::None,
                }
            }
        }
    })
}
